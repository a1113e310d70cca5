"""Preemption order (issue 18, defect 9): vLLM's priority policy with equal priorities.

``running`` keeps arrival order (a re-admitted request takes back its place, a fork comes
right after its parent), the victim is the running request that arrived last, and a preempted
request waits again ahead of the requests never admitted. Before, a re-admitted request went
to the end of ``running`` and so became the next victim, and the latest preempted request took
the head of ``waiting``: an older request could wait behind younger ones again and again.
"""

from __future__ import annotations

import torch
from helpers import assert_oracle, make_model, make_request

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.scheduler import Scheduler

D = 8


def test_a_readmitted_request_takes_back_its_arrival_place() -> None:
    model = make_model(D)
    sched = Scheduler(model, 6, 2)
    a, b, c = make_request("a", 2, 6, D, seed=1), make_request("b", 2, 6, D, seed=2), make_request("c", 12, 2, D)
    for r in (a, b, c):
        sched.add_request(r)
    sched.step()
    sched.step()  # a and b decode, c is still in its prefill
    sched.preempt_every = sched.step_id + 1  # next step: the decoding request that arrived last, b
    assert sched.schedule().preempted == (b,)
    sched.step()
    sched.preempt_every = None
    assert list(sched.waiting) == [b] and sched.running == [a, c]
    sched.step()
    assert sched.running == [a, b, c]  # back in its arrival place, not after c (c is the next victim)
    sched.run_until_complete()
    for r in (a, b, c):
        assert_oracle(model, r)


def test_a_fork_runs_right_after_its_parent() -> None:
    model = make_model(D)
    pool = BlockPool(32, 4, D)
    sched = Scheduler(model, 8, 8)
    a, b = (make_request(n, 3, 5, D, PagedKVCache(4, pool=pool), seed=i) for i, n in enumerate("ab"))
    for r in (a, b):
        sched.add_request(r)
    sched.step()
    sched.step()
    child = sched.fork("a", "a.x")
    assert sched.running == [a, child, b]  # the fork arrives with its parent, ahead of b
    sched.run_until_complete()
    for r in (a, b, child):
        assert_oracle(model, r, check_cache=False)


def test_an_older_request_is_not_starved_by_a_younger_one() -> None:
    """Three equal requests, a 4-block pool: they are preempted in turn. Before the fix the middle one,
    once re-admitted, ran last in ``running`` and was the victim again and again: it finished at
    step 10, after the youngest (step 7). Now every request finishes no later than those after it."""
    model = make_model(D)
    pool = BlockPool(4, 2, D)
    sched = Scheduler(model, 2, 2)
    reqs = [make_request(f"r{i}", 2, 4, D, PagedKVCache(2, pool=pool), seed=i) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    finished_at: dict[str, int] = {}
    while sched.running or sched.waiting:
        stats = sched.step()
        finished_at.update((r.req_id, stats["step_id"]) for r in reqs if r.finished and r.req_id not in finished_at)
    assert sched.num_preemptions >= 2
    steps = [finished_at[r.req_id] for r in reqs]
    assert steps == sorted(steps), f"finish steps by arrival: {steps}"
    for r in reqs:
        assert_oracle(model, r, check_cache=False)


def test_a_step_that_preempts_for_blocks_admits_nobody() -> None:
    """vLLM's rule: when a running request had to preempt another for blocks, no waiting request is
    admitted in that step (it would take blocks the running ones are short of and be preempted next).
    Requests arrive while others decode on a small pool, over several pool sizes."""
    model = make_model(D)
    crowded = 0
    for blocks in (5, 6, 8):
        pool = BlockPool(blocks, 2, D)
        sched = Scheduler(model, 6, 4)
        reqs = [make_request(f"r{i}", 2 + i % 3, 5, D, PagedKVCache(2, pool=pool), seed=i) for i in range(8)]
        for step in range(200):
            if step < len(reqs):
                sched.add_request(reqs[step])  # one arrival a step: some arrive while the pool is full
            if not (sched.running or sched.waiting):
                break
            plan = sched.schedule()
            assert not (plan.preempted and plan.admitted), (blocks, step, plan.preempted, plan.admitted)
            crowded += bool(plan.preempted and sched.waiting)
            sched.step()
        for r in reqs:
            assert_oracle(model, r, check_cache=False)
    assert crowded, "the pools should be short while requests wait"


def test_the_victim_is_the_latest_arrival_even_when_it_is_already_scheduled() -> None:
    """Decodes are planned before prefill chunks, so the younger B's decode is scheduled when the older A's
    chunk finds no block: B is the victim (it gives back its token and blocks), as vLLM takes the tail of
    ``running``. Before, A preempted itself while B kept its blocks."""
    model = make_model(D)
    pool = BlockPool(4, 2, D)
    sched = Scheduler(model, 4, 2)
    a = make_request("a", 6, 1, D, PagedKVCache(2, pool=pool), seed=1)
    b = make_request("b", 1, 4, D, PagedKVCache(2, pool=pool), seed=2)
    for r in (a, b):
        sched.add_request(r)
    sched.step()
    sched.step()  # a has run 4 of its 6 prompt rows, b decodes
    plan = sched.schedule()
    assert plan.preempted == (b,) and plan.decode == () and [c.request for c in plan.prefill] == [a]
    sched.run_until_complete()
    for r in (a, b):
        assert_oracle(model, r, check_cache=False)


def test_every_victim_arrived_after_every_request_that_runs_in_its_step() -> None:
    model = make_model(D)
    gen = torch.Generator().manual_seed(0)
    victims = 0
    for blocks, budget, chunk in ((5, 6, 2), (6, 4, 4), (8, 8, 3)):
        pool = BlockPool(blocks, 2, D)
        sched = Scheduler(model, budget, chunk)
        sizes = torch.randint(1, 7, (10, 2), generator=gen).tolist()
        reqs = [make_request(f"r{i}", p, n, D, PagedKVCache(2, pool=pool), seed=i) for i, (p, n) in enumerate(sizes)]
        arrival = {r.req_id: i for i, r in enumerate(reqs)}
        for step in range(300):
            if step < len(reqs):
                sched.add_request(reqs[step])
            if not (sched.running or sched.waiting):
                break
            plan = sched.schedule()
            ran = [*plan.decode, *(c.request for c in plan.prefill if c.request not in plan.admitted)]
            for victim in plan.preempted:
                assert all(arrival[victim.req_id] > arrival[r.req_id] for r in ran), (blocks, step, plan)
            victims += len(plan.preempted)
            sched.step()
        for r in reqs:
            assert_oracle(model, r, check_cache=False)
    assert victims, "the pools should be short enough to preempt"
