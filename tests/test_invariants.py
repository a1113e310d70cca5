"""The scheduler's debug mode (cb_lab/core/invariants.py): each invariant, broken on purpose, is caught
and named; a correct run passes every check (the whole suite runs with the mode on)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import make_model, make_request

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.invariants import ORACLE_MAX_ROWS, check_invariants, expected_cache_len
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.exceptions import SchedulerError
from cb_lab.model.tiny_llm import TinyLLM

D = 8


def mid_run(model: TinyLLM | None = None) -> tuple[Scheduler, list[Request], BlockPool]:
    """Three requests on one shared pool, two steps in: one decoding, two still prefilling."""
    pool = BlockPool(16, 2, D)
    sched = Scheduler(model or make_model(D), 6, 3, check_invariants=True)
    reqs = [make_request(f"r{i}", L, n, D, PagedKVCache(2, pool=pool), seed=i)
            for i, (L, n) in enumerate([(3, 5), (7, 3), (5, 4)])]
    for r in reqs:
        sched.add_request(r)
    sched.step()
    sched.step()
    assert any(r.in_decode for r in reqs) and any(r.in_prefill for r in reqs)
    return sched, reqs, pool


def check_next(sched: Scheduler) -> None:
    """Check the state as if the next step had just committed (an empty plan)."""
    plan = sched.schedule()
    check_invariants(sched, type(plan)(plan.step_id, (), ()), [])


def test_a_correct_run_passes_every_check() -> None:
    sched, reqs, pool = mid_run()
    sched.run_until_complete()
    assert all(r.finished for r in reqs) and pool.num_used_blocks == 0


def test_the_budget() -> None:
    sched, _, _ = mid_run()
    plan = sched.schedule()
    sched.max_tokens_per_step = plan.total_tokens - 1
    with pytest.raises(SchedulerError, match=rf"after step {plan.step_id}: {plan.total_tokens} tokens ran, over"):
        check_invariants(sched, plan, [])


def test_the_queues() -> None:
    sched, reqs, _ = mid_run()
    sched.waiting.append(sched.running[0])
    with pytest.raises(SchedulerError, match=r"\['r0'\] are both running and waiting"):
        check_next(sched)


def test_positions_and_blocks() -> None:
    sched, reqs, _ = mid_run()
    r = reqs[1]
    assert len(r.kv_cache) == expected_cache_len(r) == r.prefill_pos
    r.prefill_pos -= 1  # the cache now holds a row the request has not run
    with pytest.raises(SchedulerError, match=rf"request 'r1' caches {len(r.kv_cache)} rows, expected"):
        check_next(sched)
    r.prefill_pos += 1
    r.kv_cache.block_table.append(r.kv_cache.block_table[-1])  # one block too many for its rows
    with pytest.raises(SchedulerError, match="request 'r1' holds"):
        check_next(sched)


def test_ref_counts_and_the_free_list() -> None:
    sched, reqs, pool = mid_run()
    block = reqs[0].kv_cache.block_table[0]
    pool.ref_counts[block] += 1
    with pytest.raises(SchedulerError, match=rf"block {block} has ref count 2 but 1 block table"):
        check_next(sched)
    pool.ref_counts[block] -= 1
    pool.free_block_ids.append(block)  # free and in use
    with pytest.raises(SchedulerError, match="are not the blocks of ref count 0"):
        check_next(sched)
    pool.free_block_ids.remove(block)
    pool.num_tokens += 1
    with pytest.raises(SchedulerError, match="the pool counts"):
        check_next(sched)


class DriftingModel(TinyLLM):
    """A model whose fused forward is off by ``delta`` in every row from its ``nth`` call on."""

    def __init__(self, nth: int, delta: float = 1e-2) -> None:
        torch.manual_seed(0)
        super().__init__(D)
        self.nth, self.delta, self.calls = nth, delta, 0

    def forward_fused(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.calls += 1
        out, k, v = super().forward_fused(*args, **kwargs)
        return (out + self.delta if self.calls >= self.nth else out), k, v


def test_the_first_token_that_differs_from_a_recompute_is_named() -> None:
    model = DriftingModel(nth=4)
    sched, reqs, _ = mid_run(model)
    sched.step()  # step 2: still exact
    plan = sched.schedule()
    first = [*(c.request.req_id for c in plan.prefill if c.completes_prompt), *(r.req_id for r in plan.decode)][0]
    with pytest.raises(SchedulerError, match=rf"after step 3: request '{first}' token \d+ differs from a dense"):
        sched.step()  # step 3 is the model's 4th call: every row drifts


def test_the_mode_follows_the_environment_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(D)
    monkeypatch.setenv("CB_LAB_CHECK_INVARIANTS", "0")
    assert Scheduler(model).check_invariants is False and Scheduler(model, check_invariants=True).check_invariants
    monkeypatch.setenv("CB_LAB_CHECK_INVARIANTS", "1")
    assert Scheduler(model).check_invariants is True
    drifting = DriftingModel(nth=1)
    quiet = Scheduler(drifting, 6, 3, check_invariants=False)  # off: the drift goes unnoticed
    quiet.add_request(make_request("a", 3, 2, D))
    quiet.run_until_complete()
    assert quiet.num_finished == 1


def test_a_waiting_request_holds_nothing_and_max_num_seqs_holds() -> None:
    sched, reqs, _ = mid_run()
    waiting = make_request("w", 4, 2, D)
    sched.add_request(waiting)
    waiting.kv_cache.append(torch.ones(1, D), torch.ones(1, D))  # K/V for a request that never ran
    with pytest.raises(SchedulerError, match="waiting request 'w' holds K/V"):
        check_next(sched)
    sched.waiting.remove(waiting)
    sched.max_num_seqs = 2
    check_next(sched)  # a cap lowered mid-run lets the three running finish...
    plan = sched.schedule()
    over = type(plan)(plan.step_id, (), (), admitted=(waiting,))  # ...but a step must not admit over it
    with pytest.raises(SchedulerError, match="admitted 1, 3 requests run, over max_num_seqs=2"):
        check_invariants(sched, over, [])


def test_long_sequences_skip_the_recompute() -> None:
    model = DriftingModel(nth=1)
    sched = Scheduler(model, 16, 16, check_invariants=True)
    long = make_request("long", ORACLE_MAX_ROWS, 2, D)
    sched.add_request(long)
    sched.run_until_complete()  # drifts from its first call, but too long to recompute: no error
    assert long.finished


def cached_mid_run() -> tuple[Scheduler, list[Request], BlockPool]:
    """Two requests with one shared 4-row prefix on a pool of blocks of 2; the second took the first's blocks."""
    pool = BlockPool(16, 2, D)
    sched = Scheduler(make_model(D), 6, 3, check_invariants=True, enable_prefix_caching=True)
    prefix = torch.randn(4, D, generator=torch.Generator().manual_seed(1))
    reqs = [Request(f"c{i}", torch.cat([prefix, torch.randn(3, D)]), 6, PagedKVCache(2, pool=pool)) for i in range(2)]
    sched.add_request(reqs[0])
    for _ in range(3):
        sched.step()
    sched.add_request(reqs[1])
    sched.step()
    assert reqs[1].kv_cache.block_table[:2] == reqs[0].kv_cache.block_table[:2]
    return sched, reqs, pool


def test_prefix_cache_hashes_and_the_lru_list() -> None:
    sched, reqs, pool = cached_mid_run()
    check_next(sched)
    shared = reqs[0].kv_cache.block_table[0]
    pool.evictable[shared] = None  # in use and evictable
    with pytest.raises(SchedulerError, match="in use and evictable"):
        check_next(sched)
    del pool.evictable[shared]
    right = pool.block_hashes[shared]
    pool.block_hashes[shared] = right + 1  # registered under a hash that is not its rows'
    with pytest.raises(SchedulerError, match=rf"block {shared} of request 'c0' is cached under a hash"):
        check_next(sched)
    pool.block_hashes[shared] = right
    unhashed = pool.free_block_ids.pop()
    pool.evictable[unhashed] = None  # evictable, but nothing could ever find it
    with pytest.raises(SchedulerError, match="an evictable block has no hash"):
        check_next(sched)
    del pool.evictable[unhashed]
    pool.free_block_ids.append(unhashed)
    sched.run_until_complete()
    assert pool.num_used_blocks == 0 and pool.num_evictable_blocks > 0
