"""Prefix caching: cached full blocks are reused, kept after their request, evicted LRU, and never
change a single result (TinyLLM's oracle and the token model's greedy tokens, caching on == off)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import assert_oracle, make_llama, make_model
from hypothesis import given, settings
from hypothesis import strategies as st

from cb_lab.core.block_pool import BlockPool, block_hashes
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.model.llama_step import LlamaStepModel
from cb_lab.monitoring.metrics import MetricsCollector
from cb_lab.plugins.base import PluginManager
from cb_lab.plugins.builtin import MetricsPlugin

D, BS = 8, 4


def test_block_hashes_chain_full_blocks_only() -> None:
    rows = torch.arange(10)
    h = block_hashes(rows, 4)
    assert len(h) == 2  # rows 8, 9 are not a full block
    assert block_hashes(rows[:8], 4) == h and block_hashes(torch.arange(12), 4)[:2] == h
    other = rows.clone()
    other[1] = 99  # a change in block 0 changes every later hash too
    assert all(a != b for a, b in zip(block_hashes(other, 4), h))
    assert block_hashes(rows.float()[:, None], 4) != block_hashes(rows[:, None], 4)  # dtype is part of it


def test_the_pool_keeps_cached_blocks_evictable_and_evicts_the_least_recently_used() -> None:
    pool = BlockPool(4, 2, D)
    a, b, c = pool.allocate(3)
    for block, h in ((a, 10), (b, 11)):
        pool.cache_block(block, h)
    pool.free([a])
    pool.free([b])
    pool.free([c])  # never cached: truly free
    assert list(pool.evictable) == [a, b] and pool.num_free_blocks == 4 and pool.num_used_blocks == 0
    assert pool.lookup([10, 11, 12]) == [a, b] and pool.lookup([11]) == [b] and pool.lookup([99, 10]) == []
    pool.acquire([b])  # taken back: in use again, not evictable
    assert list(pool.evictable) == [a] and pool.ref_counts[b] == 1
    got = pool.allocate(2)  # the two truly free blocks first
    assert a not in got and b not in got and pool.num_evictions == 0
    (evicted,) = pool.allocate(1)  # then the least recently used cached block, forgetting its hash
    assert evicted == a and pool.num_evictions == 1 and pool.lookup([10]) == [] and a not in pool.block_hashes
    pool.free([b])
    assert pool.lookup([10, 11]) == [] and pool.lookup([11]) == [b]  # b stays cached under its hash
    assert pool.cache_stats() == {"cached_blocks": 1, "evictable_blocks": 1, "evictions": 1, "copies": 0}


def run(model: Any, prompts: list[torch.Tensor], caching: bool, *, num_blocks: int = 64, budget: int = 10,
        chunk: int = 5, new: int = 3, every: int = 1) -> tuple[list[Request], BlockPool, Scheduler, MetricsPlugin]:
    pool = BlockPool(num_blocks, BS, model.kv_dim)
    metrics = MetricsPlugin(MetricsCollector(enable_memory_profiling=False))
    plugins = PluginManager()
    plugins.register_scheduler_plugin(metrics)
    sched = Scheduler(model, budget, chunk, enable_prefix_caching=caching, plugins=plugins)
    reqs = [Request(f"r{i}", p, new, PagedKVCache(BS, pool=pool)) for i, p in enumerate(prompts)]
    pending, now = list(reqs), 0
    while pending or sched.active:
        if pending and now % every == 0:
            sched.add_request(pending.pop(0))
        sched.step()
        now += 1
    return reqs, pool, sched, metrics


def shared_prompts(prefix_len: int, suffixes: list[int], dim: int = D, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randn(prefix_len, dim, generator=gen)
    return [torch.cat([prefix, torch.randn(n, dim, generator=gen)]) for n in suffixes]


@settings(deadline=None, max_examples=40)
@given(prefix_len=st.sampled_from([3, 4, 5, 7, 8, 9, 12]), suffixes=st.lists(st.integers(0, 6), min_size=2, max_size=6),
       num_blocks=st.integers(6, 16), budget=st.integers(2, 16), chunk=st.integers(1, 8), every=st.integers(1, 3))
def test_caching_on_gives_the_same_tokens_as_off(prefix_len: int, suffixes: list[int], num_blocks: int, budget: int,
                                                 chunk: int, every: int) -> None:
    """Prefixes on, and one off, a block boundary; small pools force evictions; arrivals spread out."""
    model = make_model(D)
    prompts = [p for p in shared_prompts(prefix_len, suffixes) if p.shape[0] >= 1]
    kwargs = {"num_blocks": num_blocks, "budget": budget, "chunk": chunk, "every": every}
    off, _, _, _ = run(model, prompts, False, **kwargs)
    on, pool, _, metrics = run(model, prompts, True, **kwargs)
    for a, b in zip(off, on):
        torch.testing.assert_close(torch.stack(b.generated_tokens), torch.stack(a.generated_tokens), rtol=1e-5,
                                   atol=1e-5)
        assert_oracle(model, b, check_cache=False)
    assert pool.num_used_blocks == 0, "every block is free or evictable at the end"
    assert pool.num_free_blocks == pool.num_blocks
    summary = metrics.get_summary()["run"]
    saved, admissions = summary["prefill_tokens_saved"], len(prompts) + summary["preemptions"]
    admitted = sum(s.admitted_prompt_tokens for s in metrics.collector.steps)  # re-admissions' prefills too
    assert saved % BS == 0 and saved <= admitted - admissions  # whole blocks, never an admission's last row


def test_a_hit_saves_whole_blocks_and_leaves_the_last_row_to_compute() -> None:
    model = make_model(D)
    prompt = shared_prompts(12, [0])[0]  # three full blocks
    reqs, pool, sched, metrics = run(model, [prompt, prompt.clone(), prompt[:9].clone()], True, every=6)
    run_summary = metrics.get_summary()["run"]
    # the copy reuses 2 blocks (its third holds its last row), the 9-row prompt 2 blocks (8 rows)
    assert run_summary["prefill_tokens_saved"] == 8 + 8
    assert run_summary["prefix_hit_rate"] == pytest.approx(16 / (12 + 12 + 9))
    for r in reqs:
        assert_oracle(model, r, check_cache=False)
    assert pool.cache_stats()["cached_blocks"] == 3 and pool.num_used_blocks == 0


def test_a_preempted_request_takes_its_own_cached_blocks_back() -> None:
    model = make_model(D)
    pool = BlockPool(64, BS, D)
    sched = Scheduler(model, 32, 16, enable_prefix_caching=True)
    r = Request("r", torch.randn(10, D, generator=torch.Generator().manual_seed(4)), 5, PagedKVCache(BS, pool=pool))
    sched.add_request(r)
    sched.step()
    sched.step()  # prefilled, one decode: 11 rows, 2 full blocks cached
    sched.preempt_every = sched.step_id + 1
    sched.step()  # preempted: its blocks go back, the full ones evictable
    assert r.num_preemptions == 1 and pool.num_evictable_blocks >= 2
    sched.preempt_every = None
    plan = sched.schedule()
    (chunk,) = plan.prefill
    assert len(chunk.cached_blocks) >= 2 and chunk.start == len(chunk.cached_blocks) * BS
    sched.run_until_complete()
    assert_oracle(model, r, check_cache=False)


def test_greedy_tokens_of_a_token_model_are_the_same_with_caching_on() -> None:
    model = LlamaStepModel(make_llama())
    gen = torch.Generator().manual_seed(5)
    system = torch.randint(0, 97, (13,), generator=gen)
    prompts = [torch.cat([system, torch.randint(0, 97, (n,), generator=gen)]) for n in (4, 1, 7, 3, 5)]
    off, _, _, _ = run(model, prompts, False, new=6)
    on, pool, _, metrics = run(model, prompts, True, new=6, every=2)
    assert [[int(t) for t in r.generated_tokens] for r in on] == [[int(t) for t in r.generated_tokens] for r in off]
    assert metrics.get_summary()["run"]["prefill_tokens_saved"] > 0 and pool.num_used_blocks == 0
