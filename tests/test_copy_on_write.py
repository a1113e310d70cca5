"""Forks share every block, the last partial one too; the first write into a shared block copies
it, once, and the other holder's K/V never change. ``SamplingParams(n=...)`` prefills a prompt
once and each sample equals the same prompt run alone with that sample's params."""

from __future__ import annotations

import pytest
import torch
from helpers import TOL, assert_oracle, make_llama, make_model
from hypothesis import given, settings
from hypothesis import strategies as st

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import DenseKVCache, PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.engine import EngineConfig, LLMEngine
from cb_lab.exceptions import ConfigurationError, KVCacheError, RequestError, SchedulerError
from cb_lab.model.llama_step import LlamaStepModel
from cb_lab.monitoring.metrics import MetricsCollector
from cb_lab.sampling import SamplingParams

D, BS, VOCAB = 8, 4, 97


def rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def test_the_first_write_into_a_shared_block_copies_it_once_and_the_sharer_never_changes() -> None:
    pool = BlockPool(8, BS, D)
    parent = PagedKVCache(BS, pool=pool)
    parent.append(rows(6, 0), rows(6, 1))  # blocks [a, b]; b holds 2 of 4 rows
    child = parent.fork()
    assert child.block_table == parent.block_table and [pool.ref_counts[b] for b in parent.block_table] == [2, 2]
    before = [t.clone() for t in parent.get_kv()]
    pool_before = pool.key_cache.clone()
    assert child.blocks_needed(1) == 1  # the copy of the shared partial block
    child.append(rows(1, 2), rows(1, 3))
    assert pool.num_copies == 1 and child.block_table[0] == parent.block_table[0]
    assert child.block_table[1] != parent.block_table[1] and pool.ref_counts[parent.block_table[1]] == 1
    for now, was in zip(parent.get_kv(), before):
        assert torch.equal(now, was)  # bit-identical
    assert torch.equal(pool.key_cache[:, parent.block_table[1]], pool_before[:, parent.block_table[1]])
    k, v = child.get_kv()
    assert torch.equal(k[:6], before[0]) and torch.equal(k[6], rows(1, 2)[0]) and torch.equal(v[:6], before[1])
    child.append(rows(1, 4), rows(1, 5))  # its own block now: written in place
    parent.append(rows(1, 6), rows(1, 7))  # the only holder left of the old block: in place too
    assert pool.num_copies == 1
    assert torch.equal(parent.get_kv()[0][6], rows(1, 6)[0]) and torch.equal(child.get_kv()[0][7], rows(1, 4)[0])
    parent.release()
    child.release()
    assert pool.num_free_blocks == pool.num_blocks


def test_a_fork_at_a_block_boundary_copies_nothing() -> None:
    pool = BlockPool(8, BS, D)
    parent = PagedKVCache(BS, pool=pool)
    parent.append(rows(8, 0), rows(8, 1))
    child = parent.fork(4)
    assert len(child) == 4 and child.block_table == parent.block_table[:1] and child.blocks_needed(1) == 1
    child.append(rows(1, 2), rows(1, 3))
    assert pool.num_copies == 0 and len(child.block_table) == 2


def test_forks_need_a_shared_pool_and_a_finished_prefill() -> None:
    with pytest.raises(KVCacheError, match="shared BlockPool"):
        PagedKVCache(BS).fork()
    pool = BlockPool(8, BS, D)
    cache = PagedKVCache(BS, pool=pool)
    cache.append(rows(2, 0), rows(2, 1))
    with pytest.raises(KVCacheError, match="at most"):
        cache.fork(3)
    with pytest.raises(RequestError, match="private cache"):
        Request("d", rows(3, 0), 2, DenseKVCache()).fork("d2")
    with pytest.raises(RequestError, match="prefill is done"):
        Request("p", rows(3, 0), 2, PagedKVCache(BS, pool=pool)).fork("p2")
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigurationError, match="n must be an int >= 1"):
            SamplingParams(n=bad)  # type: ignore[arg-type]
    assert SamplingParams(seed=7, n=3).sample_params(2) == SamplingParams(seed=9)
    assert SamplingParams(n=3).sample_params(1).seed is None  # each sample's own id seeds it


def test_scheduler_fork_shares_blocks_and_both_match_the_oracle() -> None:
    model = make_model(D)
    pool = BlockPool(32, BS, D)
    sched = Scheduler(model, 16, 8, enable_prefix_caching=True)
    parent = Request("a", rows(6, 9), 6, PagedKVCache(BS, pool=pool))
    sched.add_request(parent)
    sched.step()  # prefilled: 6 rows stored, the first token drawn
    sched.step()  # one decode: 7 rows stored, block 2 partial
    used = pool.num_used_blocks
    child = sched.fork("a", "a.fork")
    assert child.parent_id == "a" and child in sched.running and pool.num_used_blocks == used
    assert child.kv_cache.block_table == parent.kv_cache.block_table  # every block, the partial one too
    stats = sched.step()  # the child recomputes row 6, the parent decodes: one copy between them
    assert stats["kv_copies"] == 1 and pool.num_copies == 1
    sched.run_until_complete()
    for req in (parent, child):
        assert_oracle(model, req, check_cache=False)
    torch.testing.assert_close(torch.stack(child.generated_tokens), torch.stack(parent.generated_tokens), **TOL)
    assert pool.num_used_blocks == 0
    with pytest.raises(SchedulerError, match="no running request"):
        sched.fork("a", "again")


def test_fork_refuses_a_used_id_and_add_request_refuses_a_fork() -> None:
    pool = BlockPool(32, BS, D)
    sched = Scheduler(make_model(D), 16, 8)
    sched.add_request(Request("a", rows(3, 0), 4, PagedKVCache(BS, pool=pool)))
    sched.step()
    with pytest.raises(SchedulerError, match="already used"):
        sched.fork("a", "a")
    child = sched.fork("a", "b")
    with pytest.raises(SchedulerError, match="Scheduler.fork adds forks"):
        sched.add_request(Request("c", rows(3, 0), 4, PagedKVCache(BS, pool=pool), parent_id="a"))
    sched.run_until_complete()
    assert child.finished and pool.num_used_blocks == 0


@settings(deadline=None, max_examples=30)
@given(prefix_len=st.integers(0, 9), suffixes=st.lists(st.integers(1, 5), min_size=1, max_size=4),
       fork_at=st.integers(1, 6), num_blocks=st.integers(6, 20), budget=st.integers(2, 12), caching=st.booleans())
def test_random_forks_keep_every_request_on_the_oracle(prefix_len: int, suffixes: list[int], fork_at: int,
                                                       num_blocks: int, budget: int, caching: bool) -> None:
    """Forks mid-run with a small pool and shared prefixes: copies, preemptions of sharers, evictions."""
    model = make_model(D)
    pool = BlockPool(num_blocks, BS, D)
    sched = Scheduler(model, budget, 4, enable_prefix_caching=caching, check_invariants=True)
    prompts = [torch.cat([rows(prefix_len, 99), rows(n, i)]) for i, n in enumerate(suffixes)]
    reqs = [Request(f"r{i}", p, 6, PagedKVCache(BS, pool=pool)) for i, p in enumerate(prompts)]
    forks: list[Request] = []
    for req in reqs:
        sched.add_request(req)
    while sched.active:
        sched.step()
        if sched.step_id in (fork_at, fork_at + 2):
            decoding = [r for r in sched.running if r.in_decode]
            if decoding:
                forks.append(sched.fork(decoding[0].req_id, f"f{len(forks)}"))
    for req in reqs + forks:
        assert_oracle(model, req, check_cache=False)
    assert pool.num_used_blocks == 0, "every block is free or evictable at the end"


def run_alone(model: LlamaStepModel, prompt: torch.Tensor, params: SamplingParams) -> list[int]:
    req = Request("alone", prompt, params.max_tokens, PagedKVCache(BS, pool=BlockPool(16, BS, model.kv_dim)),
                  sampling=params)
    sched = Scheduler(model, 64, 64)
    sched.add_request(req)
    sched.run_until_complete()
    return [int(t) for t in req.generated_tokens]


@pytest.mark.parametrize("prompt_len", [6, 8, 9])
def test_n_samples_prefill_once_and_each_equals_its_params_run_alone(prompt_len: int) -> None:
    model = LlamaStepModel(make_llama(VOCAB))
    prompt = torch.randint(0, VOCAB, (prompt_len,), generator=torch.Generator().manual_seed(1))
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=11, n=3)
    pool = BlockPool(32, BS, model.kv_dim)
    sched = Scheduler(model, 64, 64, check_invariants=True)
    parent = Request("q", prompt, 5, PagedKVCache(BS, pool=pool), sampling=params)
    sched.add_request(parent)
    steps = [sched.step()]  # the prefill: the first token drawn, then the two other samples forked
    samples = [parent] + [r for r in sched.running if r.parent_id == "q"]
    assert [r.req_id for r in samples] == ["q", "q.1", "q.2"]
    steps += sched.run_until_complete()
    for i, req in enumerate(samples):
        assert [int(t) for t in req.generated_tokens] == run_alone(model, prompt, params.sample_params(i))
    assert sum(s["prefill_tokens"] for s in steps) == prompt_len + 2  # the prompt once, one row per other sample
    assert sum(s["kv_copies"] for s in steps) == (2 if (prompt_len - 1) % BS else 0)  # a shared partial block
    assert pool.num_used_blocks == 0


@pytest.mark.parametrize("max_num_seqs", [1, 2, 3])
def test_samples_beyond_max_num_seqs_wait_for_room_and_still_equal_their_params_run_alone(max_num_seqs: int) -> None:
    model = LlamaStepModel(make_llama(VOCAB))
    prompt = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(2))
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=21, n=3)
    other = SamplingParams(max_tokens=4, temperature=0.0)
    pool = BlockPool(32, BS, model.kv_dim)
    sched = Scheduler(model, 64, 64, max_num_seqs=max_num_seqs, check_invariants=True, enable_prefix_caching=True)
    parent = Request("q", prompt, 5, PagedKVCache(BS, pool=pool), sampling=params)
    late = Request("late", prompt[:5], 4, PagedKVCache(BS, pool=pool), sampling=other)
    for req in (parent, late):
        sched.add_request(req)
    seen: dict[str, Request] = {}
    while sched.active:
        sched.step()
        assert len(sched.running) <= max_num_seqs
        seen |= {r.req_id: r for r in sched.active}
    assert sorted(seen) == ["late", "q", "q.1", "q.2"]
    for i, name in enumerate(["q", "q.1", "q.2"]):
        assert [int(t) for t in seen[name].generated_tokens] == run_alone(model, prompt, params.sample_params(i))
    assert [int(t) for t in late.generated_tokens] == run_alone(model, prompt[:5], other)
    assert pool.num_used_blocks == 0


def test_the_engine_returns_n_outputs_per_prompt_each_equal_to_its_params_run_alone() -> None:
    m = make_llama(258)  # the byte tokenizer's ids
    engine = LLMEngine(m, config=EngineConfig(block_size=BS, num_blocks=64, max_tokens_per_step=32,
                                              prefill_chunk_size=16))
    params = SamplingParams(max_tokens=6, temperature=0.9, seed=3, n=3, ignore_eos=True)
    outs = engine.generate([[5, 6, 7, 8, 9, 10, 11], [1, 2, 3]], params, progress=False)
    assert [o.request_id for o in outs] == ["req-0", "req-1"]  # one output per prompt, its samples inside
    alone = LlamaStepModel(m)
    for out, prompt in zip(outs, [[5, 6, 7, 8, 9, 10, 11], [1, 2, 3]]):
        assert out.finished and out.prompt_token_ids == prompt and [c.index for c in out.outputs] == [0, 1, 2]
        for c in out.outputs:
            assert c.token_ids == run_alone(alone, torch.tensor(prompt), params.sample_params(c.index))
            assert c.finish_reason == "length" and c.text == engine.tokenizer.decode(c.token_ids)  # type: ignore[union-attr]
        assert out.token_ids == out.outputs[0].token_ids and out.text == out.outputs[0].text  # the first sample's
    assert len({tuple(c.token_ids) for c in outs[0].outputs}) > 1, "different seeds draw different samples"
    assert engine.pool.num_used_blocks == 0
    streamed: dict[str, str] = {}
    for request_id, text in engine.stream("abc", SamplingParams(max_tokens=3, n=2, seed=1, ignore_eos=True)):
        streamed[request_id] = streamed.get(request_id, "") + text
    assert sorted(streamed) == ["req-2", "req-2.1"]


def test_a_fork_joins_a_static_batch_and_pads_its_slot() -> None:
    """Static batching pads the slots of finished requests until the batch is done; a fork is one more
    slot of the batch running (before, it was not counted and the padding went negative)."""
    model = make_model(8)
    pool = BlockPool(16, 4, 8)
    sched = Scheduler(model, 8, 8, policy="static")
    sched.add_request(Request("a", torch.randn(3, 8), 4, PagedKVCache(4, pool=pool)))
    sched.step()
    sched.step()
    sched.fork("a", "a.x")
    collector = MetricsCollector(enable_memory_profiling=False)
    history = sched.run_until_complete()
    for stats in history:
        collector.record_step(**stats)
    assert [len(s.plan.decode) for s in history] == [1, 2, 1]
    assert [s["padding_tokens"] for s in history] == [0, 0, 1]  # a finished a step before its fork
