"""The serving engine: waiting queue, admission, preemption, abort and policies, against the oracle."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import assert_oracle, make_model, make_request
from hypothesis import given, settings
from hypothesis import strategies as st

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.exceptions import ConfigurationError, SchedulerError
from cb_lab.model.oracle import oracle_error

D = 8


def shared(pool: BlockPool) -> PagedKVCache:
    return PagedKVCache(pool.block_size, pool=pool)


def check_invariants(sched: Scheduler, stats: dict[str, Any], pool: BlockPool | None) -> None:
    assert stats["total_tokens"] <= sched.max_tokens_per_step
    running, waiting = {id(r) for r in sched.running}, {id(r) for r in sched.waiting}
    assert not running & waiting, "no request both waiting and running"
    if sched.max_num_seqs is not None:
        assert len(sched.running) <= sched.max_num_seqs
    for req in sched.waiting:
        assert len(req.kv_cache) == 0 and req.prefill_pos == 0, "a waiting request holds no K/V"
    if pool is not None:
        held = sum(len(r.kv_cache.block_table) for r in sched.active if isinstance(r.kv_cache, PagedKVCache))
        assert pool.num_used_blocks == held and sorted(pool.ref_counts).count(1) == held
        assert pool.num_tokens == sum(len(r.kv_cache) for r in sched.active)


@st.composite
def serving_runs(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 6))
    reqs = [(draw(st.integers(0, 5)), draw(st.integers(1, 9)), draw(st.integers(0, 7))) for _ in range(n)]
    block_size = draw(st.sampled_from([1, 2, 3, 4]))
    biggest = max(-(-(L + max(k - 1, 0)) // block_size) for _, L, k in reqs)
    return {
        "reqs": reqs,
        "block_size": block_size,
        "num_blocks": draw(st.integers(biggest, biggest + 8)),  # always enough for any one request alone
        "budget": draw(st.integers(1, 16)),
        "chunk": draw(st.integers(1, 8)),
        "policy": draw(st.sampled_from(["decode_first", "prefill_first", "sjf", "static"])),
        "max_num_seqs": draw(st.one_of(st.none(), st.integers(1, 4))),
        "preempt_every": draw(st.one_of(st.none(), st.integers(1, 5))),
        "executor": draw(st.sampled_from(["fused", "split"])),
        "abort": draw(st.one_of(st.none(), st.tuples(st.integers(0, n - 1), st.integers(0, 12)))),
    }


@settings(deadline=None, max_examples=60)
@given(serving_runs())
def test_any_serving_run_completes_oracle_exact_and_frees_the_pool(w: dict[str, Any]) -> None:
    model = make_model(D)
    pool = BlockPool(w["num_blocks"], w["block_size"], D)
    sched = Scheduler(
        model, w["budget"], w["chunk"], executor=w["executor"], policy=w["policy"],
        max_num_seqs=w["max_num_seqs"], preempt_every=w["preempt_every"],
    )
    reqs = [make_request(f"r{i}", L, k, D, shared(pool), seed=i) for i, (_, L, k) in enumerate(w["reqs"])]
    pending = sorted(zip([a for a, _, _ in w["reqs"]], reqs), key=lambda p: p[0])
    now = 0
    while pending or sched.active:
        while pending and pending[0][0] <= now:
            sched.add_request(pending.pop(0)[1])
        if w["abort"] is not None and w["abort"][1] == now and reqs[w["abort"][0]] in sched.active:
            sched.abort(reqs[w["abort"][0]].req_id)
        check_invariants(sched, sched.step(), pool)
        now += 1
        assert now < 2_000, "the run must make progress"
    for req in reqs:
        assert req.finished
        if req.aborted:
            assert oracle_error(model, [req]) < 1e-5  # the tokens it got before the abort are exact too
        else:
            assert_oracle(model, req, check_cache=False)
    assert pool.num_used_blocks == 0 and pool.num_tokens == 0


def test_forced_preemption_recomputes_and_stays_exact() -> None:
    model = make_model(D)
    sched = Scheduler(model, 6, 3, preempt_every=2)
    reqs = [make_request(f"r{i}", L, k, D, cache) for i, (L, k, cache) in enumerate(
        [(5, 6, "dense"), (3, 5, "paged"), (4, 4, "dense")])]
    for r in reqs:
        sched.add_request(r)
    history = sched.run_until_complete()
    assert sched.num_preemptions == sum(s["preempted_requests"] for s in history) > 0
    assert sum(r.num_preemptions for r in reqs) == sched.num_preemptions
    for r in reqs:
        assert_oracle(model, r)  # the cache, rebuilt by recompute, holds exactly L + n - 1 dense rows


def test_a_preempted_request_rejoins_at_the_head_and_prefills_prompt_plus_tokens() -> None:
    model = make_model(D)
    sched = Scheduler(model, 8, 8)
    a, b = make_request("a", 3, 5, D), make_request("b", 2, 5, D)
    for r in (a, b):
        sched.add_request(r)
    sched.step()
    sched.step()  # both decoded once: 2 tokens each
    sched.preempt_every = sched.step_id + 1  # force a preemption in the next step
    plan = sched.schedule()
    assert plan.preempted == (b,)  # the latest admitted goes first
    sched.step()
    assert list(sched.waiting) == [b] and b.prefill_len == 2 + 2 and len(b.kv_cache) == 0
    sched.preempt_every = None
    plan = sched.schedule()
    assert plan.admitted == (b,) and (plan.prefill[0].start, plan.prefill[0].length) == (0, 4)
    sched.run_until_complete()
    for r in (a, b):
        assert_oracle(model, r)


def test_a_prefill_short_of_blocks_preempts_a_later_request_instead_of_waiting() -> None:
    """Two prompts admitted together fill the pool mid-prefill; waiting for blocks would stall forever."""
    model = make_model(D)
    pool = BlockPool(4, 2, D)
    sched = Scheduler(model, 4, 2)
    a, b = make_request("a", 6, 2, D, shared(pool), seed=1), make_request("b", 6, 2, D, shared(pool), seed=2)
    for r in (a, b):
        sched.add_request(r)
    sched.step()
    sched.step()  # a and b each hold rows 0:4 = 2 blocks: the pool is full, both still prefilling
    assert pool.num_free_blocks == 0 and a.in_prefill and b.in_prefill
    plan = sched.schedule()
    assert plan.preempted == (b,) and [(c.request, c.start) for c in plan.prefill] == [(a, 4)]
    history = sched.run_until_complete(max_steps=50)
    assert not sched.active and len(history) < 50 and b.num_preemptions == 1
    for r in (a, b):
        assert_oracle(model, r, check_cache=False)
    assert pool.num_used_blocks == 0


def test_a_chunk_ending_on_a_block_boundary_and_a_token_from_prefill_alone() -> None:
    model = make_model(D)
    pool = BlockPool(12, 4, D)
    sched = Scheduler(model, 8, 4)
    edge = make_request("edge", 8, 3, D, shared(pool))  # chunks 0:4 and 4:8 end exactly on blocks
    one = make_request("one", 5, 1, D, shared(pool))  # max_new_tokens reached by the prefill's own token
    for r in (edge, one):
        sched.add_request(r)
    plan = sched.schedule()
    assert [(c.request.req_id, c.start, c.length) for c in plan.prefill] == [("edge", 0, 4), ("one", 0, 4)]
    sched.step()
    assert edge.kv_cache.block_table and len(edge.kv_cache) == 4 == 4 * len(edge.kv_cache.block_table)
    history = sched.run_until_complete()
    assert one.finished and len(one.generated_tokens) == 1 and history[0]["finished_requests"] == 1
    for r in (edge, one):
        assert_oracle(model, r, check_cache=False)
    assert pool.num_used_blocks == 0


def test_abort_removes_a_request_anywhere_and_frees_its_blocks() -> None:
    model = make_model(D)
    pool = BlockPool(10, 2, D)
    sched = Scheduler(model, 8, 4, max_num_seqs=2)
    a, b, c = (make_request(x, 4, 6, D, shared(pool)) for x in "abc")
    for r in (a, b, c):
        sched.add_request(r)
    sched.step()
    assert list(sched.waiting) == [c] and sched.running == [a, b]
    used = pool.num_used_blocks
    sched.abort("a")  # running: its blocks go back at once
    assert a.aborted and a.finished and a not in sched.active and pool.num_used_blocks == used - 2
    sched.abort("c")  # waiting
    assert c.aborted and list(sched.waiting) == []
    with pytest.raises(SchedulerError, match="no active request 'a'"):
        sched.abort("a")
    sched.run_until_complete()
    assert_oracle(model, b, check_cache=False)
    assert len(b.generated_tokens) == 6 and pool.num_used_blocks == 0
    assert "aborted" in repr(a)


def test_skip_reasons_name_what_each_waiting_request_waits_for() -> None:
    model = make_model(D)
    pool = BlockPool(4, 2, D)
    sched = Scheduler(model, 4, 4, max_num_seqs=2)
    reqs = [make_request(f"r{i}", 3, 2, D, shared(pool)) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    plan = sched.schedule()
    # r0 takes 3 rows (2 blocks) and 3 of the 4 tokens; r1 would fit the blocks but only 1 token is left
    # and a chunk may be that short, so r1 is admitted with one row; r2, r3 hit max_num_seqs.
    assert [r.req_id for r in plan.admitted] == ["r0", "r1"]
    assert dict(plan.skipped) == {"r2": "max_num_seqs", "r3": "max_num_seqs"}
    sched.step()
    plan = sched.schedule()
    assert dict(plan.skipped)["r2"] == "max_num_seqs"
    blocked = Scheduler(model, 2, 2)
    blocked.add_request(make_request("x", 3, 1, D))
    blocked.add_request(make_request("y", 3, 1, D))
    assert dict(blocked.schedule().skipped) == {"y": "budget"}
    tight = Scheduler(model, 8, 8)
    small = BlockPool(2, 2, D)
    for name in ("p", "q"):
        tight.add_request(make_request(name, 3, 1, D, shared(small)))
    assert dict(tight.schedule().skipped) == {"q": "no_blocks"}


def test_static_batching_waits_for_the_whole_batch_and_counts_padding() -> None:
    model = make_model(D)
    B, n = 4, 6
    sched = Scheduler(model, 64, 64, policy="static", max_num_seqs=B)
    lengths = [n] + [1] * (B - 1) + [2, 2]  # one long request per batch and short ones; 2 more wait
    reqs = [make_request(f"r{i}", 3, k, D) for i, k in enumerate(lengths)]
    for r in reqs:
        sched.add_request(r)
    history = sched.run_until_complete()
    first_batch = history[:n]  # prefill step + n - 1 decode steps of the long request
    assert dict(sched.schedule().skipped) == {}
    assert sum(s["padding_tokens"] for s in first_batch) == (n - 1) * (B - 1)
    assert history[n]["prefill_tokens"] == 2 * 3  # the next batch starts only now
    for r in reqs:
        assert_oracle(model, r)


def test_prefill_first_and_shortest_job_first_orders() -> None:
    model = make_model(D)
    sched = Scheduler(model, 4, 4, policy="prefill_first")
    a, b = make_request("a", 2, 5, D), make_request("b", 6, 2, D)
    sched.add_request(a)
    sched.step()  # a prefilled, now decoding
    sched.add_request(b)
    plan = sched.schedule()
    assert [c.request.req_id for c in plan.prefill] == ["b"] and plan.decode == ()
    assert plan.skipped == (("a", "budget"),)
    sjf = Scheduler(model, 3, 3, policy="sjf")
    long, short = make_request("long", 3, 9, D), make_request("short", 3, 1, D)
    sjf.add_request(long)
    sjf.add_request(short)
    assert sjf.schedule().admitted == (short,)
    for s in (sched, sjf):
        s.run_until_complete()
    for r in (a, b, long, short):
        assert_oracle(model, r)


def test_without_chunked_prefill_a_prompt_runs_in_one_piece() -> None:
    model = make_model(D)
    sched = Scheduler(model, 8, 2, enable_chunked_prefill=False)
    a, b = make_request("a", 6, 2, D), make_request("b", 5, 1, D)
    sched.add_request(a)
    sched.add_request(b)
    plan = sched.schedule()
    assert [(c.request.req_id, c.length) for c in plan.prefill] == [("a", 6)] and dict(plan.skipped) == {"b": "budget"}
    sched.run_until_complete()
    for r in (a, b):
        assert_oracle(model, r)
    with pytest.raises(SchedulerError, match="chunked prefill is off"):
        sched.add_request(make_request("too_long", 8, 2, D))  # 9 rows after a preemption > budget 8


def test_bad_serving_configuration_and_requests_that_can_never_run() -> None:
    model = make_model(D)
    for kwargs, text in [({"policy": "lifo"}, "'lifo'"), ({"max_num_seqs": 0}, "max_num_seqs"),
                         ({"preempt_every": -1}, "preempt_every"), ({"enable_chunked_prefill": 1}, "bool")]:
        with pytest.raises(ConfigurationError, match=text):
            Scheduler(model, **kwargs)
    sched = Scheduler(model, 8, 4)
    with pytest.raises(SchedulerError, match="needs 5 KV blocks but its pool has 4"):
        sched.add_request(make_request("big", 8, 2, D, shared(BlockPool(4, 2, D))))
    assert sched.active == []


def test_zero_token_requests_finish_from_the_waiting_queue() -> None:
    sched = Scheduler(make_model(D), 4, 4, max_num_seqs=1)
    busy, zero = make_request("busy", 3, 4, D), Request("zero", torch.randn(2, D), 0, PagedKVCache(2))
    sched.add_request(busy)
    sched.add_request(zero)
    stats = sched.step()
    assert stats["finished_requests"] == 1 and zero not in sched.active and busy in sched.running
