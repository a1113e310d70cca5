"""Fault injection: an exception from any plugin hook, at several points of a run.

A hook that runs before anything of its step is written (``on_request_added``, ``before_step``,
``on_attention``, ``before_append``) leaves the scheduler, every request, cache and the block
pool exactly as they were before the call; an observer that runs after the commit
(``after_append``, ``on_request_completion``, ``after_step``) leaves them exactly as a fault-free
twin run has them after that step. Either way the run then completes, oracle-exact, with the
pool free. (Faults in the model, the attention and the sampler: ``tests/test_scheduler.py``.)
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import assert_oracle, make_model, make_request

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import BaseKVCache, PagedKVCache
from cb_lab.core.plan import StepPlan
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.model.tiny_llm import TinyLLM
from cb_lab.plugins.base import AttentionPlugin, CachePlugin, PluginManager, SchedulerPlugin

D = 8
SHAPES = [(0, 6, 5), (0, 3, 7), (1, 9, 3), (2, 4, 6), (4, 2, 4), (6, 7, 2)]  # (arrival step, prompt_len, max_new)
BEFORE_WRITE = ("on_request_added", "before_step", "on_attention", "before_append")
OBSERVERS = ("after_append", "on_request_completion", "after_step")


class Fault(RuntimeError):
    pass


class Trigger:
    """Raises ``Fault`` at the ``nth`` call of ``hook`` (once; later calls pass)."""

    def __init__(self, hook: str, nth: int) -> None:
        self.hook, self.nth, self.calls, self.fired = hook, nth, 0, False

    def __call__(self, hook: str) -> None:
        if hook != self.hook or self.fired:
            return
        self.calls += 1
        if self.calls == self.nth:
            self.fired = True
            raise Fault(f"injected fault in {hook} (call {self.nth})")


class FaultyScheduler(SchedulerPlugin):
    def __init__(self, trigger: Trigger) -> None:
        self.trigger = trigger

    def on_request_added(self, request: Request, step_id: int) -> None:
        self.trigger("on_request_added")

    def before_step(self, plan: StepPlan) -> None:
        self.trigger("before_step")

    def after_step(self, stats: dict[str, Any]) -> None:
        self.trigger("after_step")

    def on_request_completion(self, request: Request) -> None:
        self.trigger("on_request_completion")


class FaultyAttention(AttentionPlugin):
    def __init__(self, trigger: Trigger) -> None:
        self.trigger = trigger

    def on_attention(self, phase: str, weights: torch.Tensor) -> None:
        self.trigger("on_attention")


class FaultyCache(CachePlugin):
    def __init__(self, trigger: Trigger) -> None:
        self.trigger = trigger

    def before_append(
        self, cache: BaseKVCache, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.trigger("before_append")
        return k_new, v_new

    def after_append(self, cache: BaseKVCache, num_rows: int, nbytes: int) -> None:
        self.trigger("after_append")


def engine(model: TinyLLM, executor: str, trigger: Trigger | None) -> tuple[Scheduler, list[Request], BlockPool]:
    """A shared pool small enough to preempt, budget 6, chunks of 3; the requests are not added yet."""
    plugins = PluginManager()
    if trigger is not None:
        plugins.register_scheduler_plugin(FaultyScheduler(trigger))
        plugins.register_attention_plugin(FaultyAttention(trigger))
        plugins.register_cache_plugin(FaultyCache(trigger))
    pool = BlockPool(7, 2, D)
    sched = Scheduler(model, 6, 3, plugins=plugins, executor=executor)
    reqs = [make_request(f"r{i}", L, n, D, PagedKVCache(2, pool=pool), seed=i) for i, (_, L, n) in enumerate(SHAPES)]
    return sched, reqs, pool


def state(sched: Scheduler, reqs: list[Request], pool: BlockPool) -> tuple[Any, ...]:
    """Everything a step may change, as plain data (K/V rows by value)."""
    per_request = [
        (r.req_id, r.prefill_pos, r.prefill_len, r.finished, r.num_preemptions, len(r.kv_cache),
         list(r.kv_cache.block_table) if isinstance(r.kv_cache, PagedKVCache) else None,
         [t.tolist() for t in r.generated_tokens], r.kv_cache.get_kv()[0].tolist())
        for r in reqs
    ]
    return (sched.step_id, sched.num_finished, sched.num_preemptions, [r.req_id for r in sched.running],
            [r.req_id for r in sched.waiting], per_request, pool.stats(), list(pool.ref_counts))


def add_arrivals(sched: Scheduler, reqs: list[Request], pool: BlockPool, now: int) -> None:
    """Add the requests arriving at step ``now``; one refused by a hook fault changed nothing, and is added again."""
    for (arrival, _, _), req in zip(SHAPES, reqs):
        if arrival != now:
            continue
        before = state(sched, reqs, pool)
        try:
            sched.add_request(req)
        except Fault:
            assert state(sched, reqs, pool) == before and req not in sched.active
            sched.add_request(req)  # the fault fired once: now it is queued


@pytest.mark.parametrize("executor", ["fused", "split"])
@pytest.mark.parametrize("nth", [1, 3, 6])  # each hook runs at least 6 times (6 requests)
@pytest.mark.parametrize("hook", BEFORE_WRITE + OBSERVERS)
def test_a_hook_fault_changes_nothing_or_leaves_the_step_committed(hook: str, nth: int, executor: str) -> None:
    model = make_model(D)
    trigger = Trigger(hook, nth)
    sched, reqs, pool = engine(model, executor, trigger)
    twin, twin_reqs, twin_pool = engine(model, executor, None)  # the same run without faults
    now = 0
    while now < 200 and (sched.active or now <= max(a for a, _, _ in SHAPES)):
        add_arrivals(sched, reqs, pool, now)
        add_arrivals(twin, twin_reqs, twin_pool, now)
        assert state(sched, reqs, pool) == state(twin, twin_reqs, twin_pool)
        if sched.active:
            before = state(sched, reqs, pool)
            fired = trigger.fired
            try:
                sched.step()
            except Fault:
                assert not fired and trigger.fired
                if hook in BEFORE_WRITE:
                    assert state(sched, reqs, pool) == before, f"{hook} fault changed state"
                    sched.step()  # the retry computes the very step that failed
                twin.step()
                assert state(sched, reqs, pool) == state(twin, twin_reqs, twin_pool), f"{hook}: not as after the step"
            else:
                twin.step()
        now += 1
    assert trigger.fired, f"the run never called {hook} {nth} times"
    assert not sched.active and pool.num_used_blocks == 0 and twin_pool.num_used_blocks == 0
    for req in reqs:
        assert_oracle(model, req, check_cache=False)
    assert sched.num_preemptions > 0, "the pool is small enough to preempt"
