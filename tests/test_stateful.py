"""A hypothesis state machine over the public API: requests of random shapes added at random
times, steps, aborts, and knobs turned between steps, on one small shared block pool.

After every step: the budget was respected, no request is both waiting and running, every
finished request is oracle-exact, the pool's owned + free blocks are all its blocks, no ref
count is negative, and every cache's length agrees with its request's ``prefill_pos`` and tokens.
``HYPOTHESIS_PROFILE=long`` (tests/conftest.py) runs it far deeper.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import torch
from helpers import assert_oracle, make_model
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.invariants import expected_cache_len
from cb_lab.core.kv_cache import DenseKVCache, PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.model.oracle import oracle_error
from cb_lab.model.tiny_llm import TinyLLM

D = 8
BLOCK_SIZE = 2
NUM_BLOCKS = 24  # a request needs at most ceil((12 + 6 - 1) / 2) = 9 blocks: it always fits alone


class ServingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.model = make_model(D)
        self.pool = BlockPool(NUM_BLOCKS, BLOCK_SIZE, D)
        self.sched = Scheduler(self.model, 8, 3, max_num_seqs=4)
        self.requests: list[Request] = []
        self.last_stats: dict[str, Any] | None = None

    @rule(prompt_len=st.integers(1, 12), max_new=st.integers(0, 6), shared=st.booleans(), seed=st.integers(0, 99))
    def add_request(self, prompt_len: int, max_new: int, shared: bool, seed: int) -> None:
        prompt = torch.randn(prompt_len, D, generator=torch.Generator().manual_seed(seed))
        cache = PagedKVCache(BLOCK_SIZE, pool=self.pool) if shared else DenseKVCache()
        req = Request(f"r{len(self.requests)}", prompt, max_new, cache)
        self.sched.add_request(req)
        self.requests.append(req)

    @rule()
    def step(self) -> None:
        budget = self.sched.max_tokens_per_step
        self.last_stats = self.sched.step()
        assert self.last_stats["total_tokens"] <= budget

    @precondition(lambda self: bool(self.sched.active))
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        req = data.draw(st.sampled_from(self.sched.active))
        self.sched.abort(req.req_id)
        assert req.aborted and req not in self.sched.active and len(req.kv_cache) == 0

    @rule(budget=st.integers(1, 12), chunk=st.integers(1, 6))
    def turn_the_knobs(self, budget: int, chunk: int) -> None:
        self.sched.max_tokens_per_step, self.sched.prefill_chunk_size = budget, chunk

    @invariant()
    def queues_are_disjoint(self) -> None:
        running, waiting = {id(r) for r in self.sched.running}, {id(r) for r in self.sched.waiting}
        assert not running & waiting
        assert len(self.sched.running) <= 4

    @invariant()
    def pool_accounts_for_every_block(self) -> None:
        held = Counter(b for r in self.sched.active if isinstance(r.kv_cache, PagedKVCache)
                       for b in r.kv_cache.block_table)
        assert self.pool.num_used_blocks + self.pool.num_free_blocks == NUM_BLOCKS
        assert min(self.pool.ref_counts) >= 0
        assert all(self.pool.ref_counts[b] == n for b, n in held.items())
        assert self.pool.num_used_blocks == len(held)
        caches = [r.kv_cache for r in self.sched.active]
        shared = [c for c in caches if isinstance(c, PagedKVCache) and c.shares_pool]
        assert self.pool.num_tokens == sum(len(c) for c in shared)

    @invariant()
    def caches_match_positions(self) -> None:
        for req in self.sched.active:
            assert len(req.kv_cache) == expected_cache_len(req), req
        for req in self.sched.waiting:
            assert len(req.kv_cache) == 0 and req.prefill_pos == 0

    @invariant()
    def finished_requests_are_oracle_exact(self) -> None:
        for req in self.requests:
            if req.finished:
                exact(self.model, req)

    def teardown(self) -> None:
        self.sched.run_until_complete(max_steps=2_000)
        assert not self.sched.active, "every run finishes"
        assert self.pool.num_used_blocks == 0 and self.pool.num_tokens == 0
        for req in self.requests:
            assert req.finished
            exact(self.model, req)


def exact(model: TinyLLM, req: Request) -> None:
    """All its tokens (an aborted request holds fewer than max_new_tokens) match the oracle."""
    if req.aborted:
        assert oracle_error(model, [req]) < 1e-5
    else:
        assert_oracle(model, req, check_cache=False)


LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
ServingMachine.TestCase.settings = settings(
    max_examples=400 if LONG else 25, stateful_step_count=80 if LONG else 30, deadline=None
)
TestServingMachine = ServingMachine.TestCase
