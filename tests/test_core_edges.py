"""The core at its edges: inputs and settings a caller gets wrong, each refused before anything changes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import assert_oracle, make_model

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import BaseKVCache, DenseKVCache, PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.exceptions import ConfigurationError, SchedulerError, ValidationError
from cb_lab.monitoring.metrics import MetricsCollector
from cb_lab.plugins.base import CachePlugin, PluginManager, SchedulerPlugin
from cb_lab.sampling import SamplingParams

D = 8


def paged(pool: BlockPool) -> PagedKVCache:
    return PagedKVCache(pool.block_size, pool=pool)


def decoding(pool: BlockPool, **kwargs: Any) -> tuple[Scheduler, Request]:
    sched = Scheduler(make_model(D), 8, 4, **kwargs)
    a = Request("a", torch.randn(3, D), 4, paged(pool))
    sched.add_request(a)
    sched.step()
    return sched, a


@pytest.mark.parametrize(("new_id", "sampling"), [("", None), (7, None), (None, None), ("ok", "greedy")])
def test_a_refused_fork_holds_no_block(new_id: Any, sampling: Any) -> None:
    pool = BlockPool(4, 2, D)
    sched, a = decoding(pool)
    before = list(pool.ref_counts)
    with pytest.raises(ValidationError):
        sched.fork("a", new_id, sampling)
    assert pool.ref_counts == before and sched.running == [a]
    sched.run_until_complete()
    assert pool.num_used_blocks == 0 and pool.num_tokens == 0


def test_a_fork_whose_added_hook_raises_is_left_out_and_shares_no_block() -> None:
    class Refuse(SchedulerPlugin):
        def on_request_added(self, request: Request, step_id: int) -> None:
            if request.parent_id is not None:
                raise RuntimeError("no forks here")

    manager = PluginManager()
    manager.register_scheduler_plugin(Refuse())
    pool = BlockPool(4, 2, D)
    sched, a = decoding(pool, plugins=manager)
    before = list(pool.ref_counts)
    with pytest.raises(RuntimeError, match="no forks here"):
        sched.fork("a", "a.x")
    assert pool.ref_counts == before and sched.running == [a]


def test_a_fork_past_max_num_seqs_is_refused() -> None:
    sched, _ = decoding(BlockPool(8, 2, D), max_num_seqs=1)
    with pytest.raises(SchedulerError, match="max_num_seqs=1: no room to fork 'a'"):
        sched.fork("a", "a.x")


def test_a_lowered_max_num_seqs_lets_the_running_finish_and_admits_nobody_over_it() -> None:
    model = make_model(D)
    sched = Scheduler(model, 8, 4, check_invariants=True)
    reqs = [Request(f"r{i}", torch.randn(2, D), 4, DenseKVCache()) for i in range(4)]
    for r in reqs[:3]:
        sched.add_request(r)
    sched.step()
    sched.max_num_seqs = 1
    sched.add_request(reqs[3])
    history = sched.run_until_complete()
    admitted = [s.plan.admitted for s in history if s.plan is not None and s.plan.admitted]
    assert admitted == [(reqs[3],)]  # only once the three had finished
    for r in reqs:
        assert_oracle(model, r)


def test_sampling_is_refused_for_vector_tokens() -> None:
    with pytest.raises(ValidationError, match="sampling is for token ids"):
        Request("v", torch.randn(2, D), 3, DenseKVCache(), sampling=SamplingParams(temperature=0.0))


def test_rows_from_a_before_append_hook_are_checked_before_any_write() -> None:
    class Triple(CachePlugin):
        on = False

        def before_append(self, cache: BaseKVCache, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
            return (k.repeat(3, 1), v.repeat(3, 1)) if self.on else (k, v)

    manager, hook, pool = PluginManager(), Triple(), BlockPool(8, 2, D)
    manager.register_cache_plugin(hook)
    model = make_model(D)
    sched = Scheduler(model, 8, 4, plugins=manager)
    reqs = [Request(r, torch.randn(2, D), 4, paged(pool)) for r in "xy"]
    for r in reqs:
        sched.add_request(r)
    sched.step()
    hook.on = True
    before = ([(len(r.kv_cache), len(r.generated_tokens), r.prefill_pos) for r in reqs], list(pool.ref_counts))
    with pytest.raises(ValidationError, match="expected 1 K/V rows, got 3"):
        sched.step()
    assert ([(len(r.kv_cache), len(r.generated_tokens), r.prefill_pos) for r in reqs], list(pool.ref_counts)) == before
    hook.on = False
    sched.run_until_complete()
    for r in reqs:
        assert_oracle(model, r, check_cache=False)


def test_turning_chunked_prefill_off_under_a_long_prompt_is_refused() -> None:
    sched = Scheduler(make_model(D), 4, 4)
    sched.add_request(Request("big", torch.randn(10, D), 2, DenseKVCache()))
    sched.step()
    with pytest.raises(SchedulerError, match=r"enable_chunked_prefill=False is refused \(the setting stays True\)"):
        sched.enable_chunked_prefill = False
    assert sched.enable_chunked_prefill is True
    sched.max_tokens_per_step = 2  # still fine with chunks
    assert len(sched.run_until_complete(max_steps=100)) < 100


def test_switching_to_static_mid_run_pads_no_negative_slot() -> None:
    sched = Scheduler(make_model(D), 8, 4)
    collector = MetricsCollector(enable_memory_profiling=False)
    for i in range(5):
        sched.add_request(Request(f"r{i}", torch.randn(2, D), 2 + i, DenseKVCache()))
        collector.record_step(**sched.step())
    sched.policy = "static"
    for stats in sched.run_until_complete():
        collector.record_step(**stats)
        assert stats["padding_tokens"] >= 0


def test_sjf_keeps_a_preempted_request_ahead_of_shorter_newcomers() -> None:
    pool = BlockPool(4, 2, D)
    sched = Scheduler(make_model(D), 8, 8, policy="sjf", preempt_every=3)
    long = Request("long", torch.randn(3, D), 6, paged(pool))
    sched.add_request(long)
    for i in range(60):
        sched.add_request(Request(f"s{i}", torch.randn(1, D), 2, paged(pool)))  # a short one every step
        sched.step()
        if long.finished:
            break
    assert long.finished and long.num_preemptions > 0


def test_model_output_rows_that_are_not_finite_tokens_fail_in_compute() -> None:
    model = make_model(D)
    sched = Scheduler(model, 8, 4, sampler=None)
    req = Request("a", torch.randn(3, D), 3, DenseKVCache())
    sched.add_request(req)
    real = model.forward_fused

    def nan_rows(*args: Any, **kwargs: Any) -> Any:
        out, k, v = real(*args, **kwargs)
        return torch.full_like(out, float("nan")), k, v

    model.forward_fused = nan_rows  # type: ignore[method-assign]
    with pytest.raises(ValidationError, match="finite"):
        sched.step()
    assert (req.prefill_pos, len(req.kv_cache), req.generated_tokens) == (0, 0, [])
    model.forward_fused = real  # type: ignore[method-assign]
    sched.run_until_complete()
    assert_oracle(model, req)


def test_a_plan_commits_once_and_only_in_its_step() -> None:
    sched = Scheduler(make_model(D), 8, 4)
    req = Request("a", torch.randn(3, D), 3, DenseKVCache())
    sched.add_request(req)
    plan = sched.schedule()
    result = sched.executor.run(plan)
    sched.commit(plan, result)
    with pytest.raises(SchedulerError, match="it is for step 0, the scheduler is at step 1"):
        sched.commit(plan, result)
    assert (req.prefill_pos, len(req.generated_tokens)) == (3, 1)
    plan = sched.schedule()
    with pytest.raises(SchedulerError, match="outputs do not match"):
        sched.commit(plan, type(result)((), ()))


@pytest.mark.parametrize(("make", "error", "message"), [
    (lambda: Scheduler(make_model(D), executor=["fused"]), ConfigurationError, r"executor must be one of"),
    (lambda: Scheduler(make_model(D), plugins=[]), ConfigurationError, "plugins must be a PluginManager"),
    (lambda: setattr(Scheduler(make_model(D)).config, "max_tokens", 3), ConfigurationError, "no setting 'max_tokens'"),
    (lambda: Scheduler(make_model(D)).run_until_complete(max_steps=-1), SchedulerError, "max_steps must be an int"),
    (lambda: MetricsCollector(enable_memory_profiling=False).record_step(
        0, 1, 0, 0, 0, 0.1, status="no_active_requests"), ValidationError, "an idle step"),
], ids=["executor-list", "plugins-list", "config-typo", "max-steps", "idle-with-tokens"])
def test_bad_settings_name_the_value_and_the_fix(make: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        make()
