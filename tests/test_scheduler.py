"""The scheduler against the oracle: any schedule, same numbers (DESIGN.md sections 2-3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import TOL, assert_oracle, make_model, make_request
from hypothesis import given, settings
from hypothesis import strategies as st

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.exceptions import KVCacheError, ValidationError
from cb_lab.monitoring.metrics import MetricsCollector

STAT_KEYS = {
    "step_id", "decode_tokens", "prefill_tokens", "total_tokens",
    "active_requests", "finished_requests", "step_duration", "status",
    "waiting_requests", "preempted_requests", "padding_tokens", "prefix_hit_tokens", "prefix_hit_blocks",
    "admitted_prompt_tokens", "admitted_prompt_blocks", "kv_evictions", "kv_copies",
}


def expected_tokens(sched: Scheduler) -> int:
    """Work conservation: a step runs min(budget, decodes + what prefill can take)."""
    decoders = sum(r.in_decode for r in sched.active)
    prefill = sum(min(sched.prefill_chunk_size, r.prompt_len - r.prefill_pos) for r in sched.active if r.in_prefill)
    return min(sched.max_tokens_per_step, decoders + prefill)


def run_checked(sched: Scheduler, arrivals: list[tuple[int, Request]]) -> list[dict[str, Any]]:
    """Run to completion, checking budget and work conservation before every step."""
    pending = sorted(arrivals, key=lambda a: a[0])
    history: list[dict[str, Any]] = []
    now = 0
    while pending or sched.active:
        while pending and pending[0][0] <= now:
            sched.add_request(pending.pop(0)[1])
        want = expected_tokens(sched)
        stats = sched.step()
        assert stats["total_tokens"] <= sched.max_tokens_per_step
        assert stats["total_tokens"] == want
        history.append(stats)
        now += 1
        assert now < 10_000, "no progress"
    return history


@st.composite
def workloads(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 6))
    return {
        "dim": draw(st.integers(1, 64)),
        "budget": draw(st.integers(1, 32)),
        "chunk": draw(st.integers(1, 16)),
        "cache": draw(st.sampled_from(["dense", "paged", "shared"])),
        "executor": draw(st.sampled_from(["fused", "split"])),
        "block_size": draw(st.sampled_from([1, 2, 3, 5, 7, 16])),
        "tanh": draw(st.booleans()),
        "reqs": [(draw(st.integers(0, 6)), draw(st.integers(1, 12)), draw(st.integers(0, 8))) for _ in range(n)],
    }


@settings(deadline=None, max_examples=60)
@given(workloads())
def test_any_schedule_matches_the_oracle(w: dict[str, Any]) -> None:
    model = make_model(w["dim"], seed=w["dim"])
    sampler = torch.tanh if w["tanh"] else None
    sched = Scheduler(model, w["budget"], w["chunk"], sampler=sampler, executor=w["executor"])
    bs, shared = w["block_size"], w["cache"] == "shared"
    pool = BlockPool(sum(-(-(L + n) // bs) for _, L, n in w["reqs"]), bs, w["dim"])  # room for all at once
    reqs = [
        make_request(f"r{i}", L, n, w["dim"], PagedKVCache(bs, pool=pool) if shared else w["cache"], bs, seed=i)
        for i, (_, L, n) in enumerate(w["reqs"])
    ]
    run_checked(sched, [(arrive, req) for (arrive, _, _), req in zip(w["reqs"], reqs)])
    for req in reqs:
        assert req.finished and len(req.generated_tokens) == req.max_new_tokens
        full = req.prompt_len + req.max_new_tokens - 1 if req.max_new_tokens else 0
        assert len(req.kv_cache) == (0 if shared else full)  # a shared pool's blocks go back at finish
        assert_oracle(model, req, sampler=sampler, check_cache=not shared)
    assert pool.num_used_blocks == 0 and pool.num_tokens == 0 and set(pool.ref_counts) <= {0}


def test_chunked_prefill_gives_the_numbers_of_one_shot_prefill() -> None:
    model = make_model(16)
    outs = []
    for budget, chunk in [(1, 1), (3, 2), (64, 64)]:
        req = make_request("a", 13, 5, seed=7)
        sched = Scheduler(model, budget, chunk)
        sched.add_request(req)
        sched.run_until_complete()
        outs.append(torch.stack(req.generated_tokens))
    torch.testing.assert_close(outs[0], outs[2], **TOL)
    torch.testing.assert_close(outs[1], outs[2], **TOL)


def test_decode_goes_first_then_prefill_fills_the_rest_in_arrival_order() -> None:
    sched = Scheduler(make_model(8), max_tokens_per_step=6, prefill_chunk_size=4)
    a, b, c = make_request("a", 2, 3, 8), make_request("b", 9, 3, 8), make_request("c", 9, 3, 8)
    for r in (a, b, c):
        sched.add_request(r)
    first = sched.schedule()
    assert [(ch.request.req_id, ch.start, ch.length) for ch in first.prefill] == [("a", 0, 2), ("b", 0, 4)]
    sched.step()
    second = sched.schedule()
    assert [r.req_id for r in second.decode] == ["a"]
    assert [(ch.request.req_id, ch.start, ch.length) for ch in second.prefill] == [("b", 4, 4), ("c", 0, 1)]
    assert repr(second) == "step 1: decode [a] | prefill [b 4:8, c 0:1] (6 tokens) | admitted [c]"


def test_schedule_is_pure() -> None:
    sched = Scheduler(make_model(8), 4, 2)
    req = make_request("a", 5, 2, 8)
    sched.add_request(req)
    before = (req.prefill_pos, len(req.kv_cache), sched.step_id)
    assert repr(sched.schedule()) == repr(sched.schedule())
    assert (req.prefill_pos, len(req.kv_cache), sched.step_id) == before


def test_lowered_budget_rotates_decodes_round_robin() -> None:
    model = make_model(8)
    sched = Scheduler(model, max_tokens_per_step=32, prefill_chunk_size=32)
    reqs = [make_request(f"r{i}", 2, 20, 8) for i in range(6)]
    for r in reqs:
        sched.add_request(r)
    sched.step()  # all six prefill; each now holds one token
    sched.max_tokens_per_step = 4
    picked: list[list[str]] = []
    counts = {r.req_id: 0 for r in reqs}
    for _ in range(9):
        plan = sched.schedule()
        picked.append([r.req_id for r in plan.decode])
        for r in plan.decode:
            counts[r.req_id] += 1
        sched.step()
    assert picked[0] == ["r0", "r1", "r2", "r3"]
    assert picked[1] == ["r4", "r5", "r0", "r1"]  # r4, r5 waited longest
    assert picked[2] == ["r2", "r3", "r4", "r5"]
    assert set(counts.values()) == {6}  # 9 steps x 4 tokens = 36 = 6 each: nobody starves
    sched.max_tokens_per_step = 32
    sched.run_until_complete()
    for r in reqs:
        assert_oracle(model, r)


def test_requests_join_between_steps_and_leave_when_finished() -> None:
    model = make_model(8)
    sched = Scheduler(model, 8, 4)
    a = make_request("a", 3, 2, 8)
    sched.add_request(a)
    sched.step()
    b = make_request("b", 4, 1, 8)
    sched.add_request(b)
    assert [r.req_id for r in sched.active] == ["a", "b"]
    stats = sched.step()
    assert stats["finished_requests"] == 2 and sched.active == [] and sched.num_finished == 2
    c = make_request("a", 2, 1, 8)  # a finished id may be reused
    sched.add_request(c)
    sched.run_until_complete()
    for r in (a, b, c):
        assert_oracle(model, r)


def test_zero_token_request_completes_at_the_next_step_without_running() -> None:
    sched = Scheduler(make_model(8), 8, 4)
    zero, one = make_request("z", 4, 0, 8), make_request("o", 4, 1, 8)
    sched.add_request(zero)
    sched.add_request(one)
    assert zero.finished and zero not in sched.schedule().decode
    assert all(ch.request is not zero for ch in sched.schedule().prefill)
    stats = sched.step()
    assert stats["finished_requests"] == 2 and len(zero.kv_cache) == 0 and zero.generated_tokens == []


def test_step_stats_feed_metrics_collector_as_they_are() -> None:
    sched = Scheduler(make_model(8), 8, 4)
    sched.add_request(make_request("a", 5, 3, 8))
    collector = MetricsCollector(enable_memory_profiling=False)
    history = sched.run_until_complete()
    history.append(sched.step())
    for stats in history:
        assert set(stats) == STAT_KEYS
        collector.record_step(**stats)
    assert history[-1]["status"] == "no_active_requests" and history[-1]["total_tokens"] == 0
    summary = collector.get_step_summary()
    assert summary["total_tokens_processed"] == 5 + 2  # prompt rows + decode tokens (token 1 came from prefill)
    assert [s["step_id"] for s in history[:-1]] == list(range(len(history) - 1))


class FlakyModel:
    """Wraps a model; the forward calls numbered in ``fail_calls`` (1-based, any forward) raise."""

    def __init__(self, model: Any, fail_calls: set[int]) -> None:
        self.model, self.fail_calls, self.calls = model, fail_calls, 0
        self.dim, self.device, self.dtype = model.dim, model.device, model.dtype
        self.token_shape, self.kv_dim = model.token_shape, model.kv_dim

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls in self.fail_calls:
            raise RuntimeError(f"injected fault in {name}")
        return getattr(self.model, name)(*args, **kwargs)

    def forward_prefill_ragged(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("forward_prefill_ragged", *args, **kwargs)

    def forward_decode(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("forward_decode", *args, **kwargs)

    def forward_fused(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("forward_fused", *args, **kwargs)


def snapshot(reqs: list[Request]) -> list[tuple[Any, ...]]:
    return [
        (r.prefill_pos, len(r.generated_tokens), r.finished, len(r.kv_cache), r.kv_cache.get_kv()[0].clone())
        for r in reqs
    ]


def run_through_faults(sched: Scheduler, reqs: list[Request], pool: BlockPool, error: type[Exception]) -> list[
        Exception]:
    """Step until nothing is active; every step that raises ``error`` must leave the requests and the pool
    as they were. Returns the errors raised."""
    faults: list[Exception] = []
    while sched.active:
        before, step_id, pool_before = snapshot(reqs), sched.step_id, pool.stats()
        try:
            sched.step()
        except error as e:
            faults.append(e)
            assert sched.step_id == step_id and pool.stats() == pool_before
            for (*meta_b, k_b), (*meta_a, k_a) in zip(before, snapshot(reqs)):
                assert meta_b == meta_a
                torch.testing.assert_close(k_b, k_a, rtol=0, atol=0)
    return faults


@pytest.mark.parametrize("executor", ["fused", "split"])
@pytest.mark.parametrize("cache", ["dense", "paged", "shared"])
@pytest.mark.parametrize("fail_calls", [{1}, {2}, {3, 4}, {2, 5, 7}])
def test_a_fault_in_compute_changes_nothing_and_the_run_completes(
    executor: str, cache: str, fail_calls: set[int]
) -> None:
    """Faults land in prefill forwards, decode forwards and (split) between two decodes of one step."""
    model = make_model(8)
    sched = Scheduler(FlakyModel(model, fail_calls), 6, 3, executor=executor)  # type: ignore[arg-type]
    pool = BlockPool(16, 3, 8)
    reqs = [
        make_request(f"r{i}", L, n, 8, PagedKVCache(3, pool=pool) if cache == "shared" else cache, 3)
        for i, (L, n) in enumerate([(5, 4), (2, 6), (7, 3)])
    ]
    for r in reqs:
        sched.add_request(r)
    assert len(run_through_faults(sched, reqs, pool, RuntimeError)) == len(fail_calls)
    for r in reqs:
        assert_oracle(model, r, check_cache=cache != "shared")
    assert pool.stats()["used_blocks"] == 0


class BadKVModel(FlakyModel):
    """Wraps a model; forward call number ``bad_call`` returns its K and V rows spoiled by ``spoil``."""

    def __init__(self, model: Any, bad_call: int, spoil: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__(model, set())
        self.bad_call, self.spoil = bad_call, spoil

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        out, k, v = super()._call(name, *args, **kwargs)
        return (out, self.spoil(k), self.spoil(v)) if self.calls == self.bad_call else (out, k, v)


@pytest.mark.parametrize("executor", ["fused", "split"])
@pytest.mark.parametrize(("spoil", "error", "message"), [
    (lambda kv: kv[:, :-1], KVCacheError, "dim 7 but the model's KV cache holds dim 8"),
    (lambda kv: torch.cat([kv, kv[:1]]), ValidationError, "K/V rows, got"),
    (lambda kv: kv.to(torch.int64), ValidationError, "floating point"),
    (lambda kv: kv[:, :, None], ValidationError, "equal shapes"),
], ids=["dim", "rows", "dtype", "3d"])
def test_a_model_that_returns_bad_kv_rows_fails_its_step_in_compute(
    executor: str, spoil: Callable[[torch.Tensor], torch.Tensor], error: type[Exception], message: str,
) -> None:
    """The executor checks the model's new K/V of a whole call once (the commit stores them unchecked): a
    spoiled call fails in compute, nothing changes, and the step then runs."""
    model = make_model(8)
    pool = BlockPool(16, 3, 8)
    sched = Scheduler(BadKVModel(model, 3, spoil), 6, 3, executor=executor)  # type: ignore[arg-type]
    reqs = [make_request(f"r{i}", L, n, 8, PagedKVCache(3, pool=pool), 3) for i, (L, n) in enumerate([(5, 4), (2, 6)])]
    for r in reqs:
        sched.add_request(r)
    faults = run_through_faults(sched, reqs, pool, error)  # the one spoiled call (split: maybe mid-step)
    assert len(faults) == 1 and message in str(faults[0])
    for r in reqs:
        assert_oracle(model, r, check_cache=False)


def test_a_failing_sampler_changes_nothing() -> None:
    model = make_model(8)
    calls = {"n": 0}

    def sampler(row: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:
            raise ValueError("sampler fault")
        return torch.tanh(row)

    # The debug mode calls the sampler again to check each token: off, so the fault lands where counted.
    sched = Scheduler(model, 8, 4, sampler=sampler, check_invariants=False)
    reqs = [make_request("a", 3, 4, 8), make_request("b", 2, 4, 8)]
    for r in reqs:
        sched.add_request(r)
    sched.step()
    before = snapshot(reqs)
    with pytest.raises(ValueError, match="sampler fault"):
        sched.step()
    assert [s[:4] for s in snapshot(reqs)] == [s[:4] for s in before]
    sched.run_until_complete()
    for r in reqs:
        assert_oracle(model, r, sampler=torch.tanh)


def test_sampler_returning_a_wrong_shape_is_rejected() -> None:
    sched = Scheduler(make_model(8), 8, 4, sampler=lambda row: row[:2])
    sched.add_request(make_request("a", 2, 2, 8))
    with pytest.raises(ValidationError, match=r"sampler must map a \(8,\) row"):
        sched.step()


@pytest.mark.parametrize("sampler, needle", [
    (lambda row: row.to(torch.float64), "torch.float32 on cpu like its input row, got torch.float64"),
    (lambda row: (row > 0).float().long(), "got torch.int64"),
    (lambda row: row / 0.0, "NaN or inf"),
])
@pytest.mark.parametrize("executor", ["fused", "split"])
def test_a_sampler_returning_a_bad_token_is_refused_in_compute_and_changes_nothing(
    sampler: Callable[[torch.Tensor], torch.Tensor], needle: str, executor: str
) -> None:
    model = make_model(8)
    sched = Scheduler(model, 8, 4, sampler=sampler, executor=executor)
    good, other = make_request("a", 3, 3, 8), make_request("b", 2, 2, 8, "paged", block_size=2)
    for r in (good, other):
        sched.add_request(r)
    with pytest.raises(ValidationError, match=needle):
        sched.step()
    assert (good.prefill_pos, len(good.kv_cache), good.generated_tokens) == (0, 0, [])
    assert (other.prefill_pos, len(other.kv_cache), other.generated_tokens) == (0, 0, [])
    sched.executor.sampler = torch.tanh  # a good sampler: the same requests now run to the end, exact
    sched.run_until_complete()
    for r in (good, other):
        assert_oracle(model, r, sampler=torch.tanh)


def test_repr_shows_the_state() -> None:
    sched = Scheduler(make_model(8), 8, 4)
    sched.add_request(make_request("a", 2, 1, 8))
    assert repr(sched) == "Scheduler(step=0, active=1, waiting=1, finished=0, budget=8, chunk=4)"
    sched.step()
    assert repr(sched) == "Scheduler(step=1, active=0, finished=1, budget=8, chunk=4)"


@pytest.mark.parametrize("executor", ["fused", "split"])
def test_a_recorded_token_owns_its_storage(executor: str) -> None:
    """Not a view of the step's [N, D] output: that would keep every step's output alive per token."""
    sched = Scheduler(make_model(8), 16, 8, executor=executor)
    reqs = [make_request(f"r{i}", 5, 3, 8) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    sched.run_until_complete()
    for r in reqs:
        assert all(t.untyped_storage().nbytes() == 8 * 4 for t in r.generated_tokens)
