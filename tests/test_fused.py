"""The fused one-forward step: batched paged attention, forward_fused, decode_inputs, and the shared pool's limits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import TOL, assert_oracle, make_model, make_request
from hypothesis import given, settings
from hypothesis import strategies as st

from cb_lab.attention.dense_attention import scaled_dot_product_attention
from cb_lab.attention.paged_attention import GatherWorkspace, paged_attention
from cb_lab.core.batch_builder import cached_prefix_mask
from cb_lab.core.block_pool import BlockPool
from cb_lab.core.executor import decode_inputs
from cb_lab.core.kv_cache import BaseKVCache, DenseKVCache, PagedKVCache
from cb_lab.core.plan import PrefillChunk, StepPlan
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler, check_blocks
from cb_lab.exceptions import ConfigurationError, SchedulerError
from cb_lab.exceptions import MemoryError as CBLabMemoryError
from cb_lab.model.tiny_llm import TinyLLM

D = 8


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- paged attention == dense attention per request


@st.composite
def paged_batches(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "block_size": draw(st.sampled_from([1, 3, 5, 7])),
        "dim": draw(st.integers(1, 8)),
        "lens": draw(st.lists(st.integers(1, 17), min_size=1, max_size=6)),
        "spare_blocks": draw(st.integers(0, 3)),
        "with_new": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(deadline=None, max_examples=50)
@given(paged_batches())
def test_paged_attention_equals_dense_attention_per_request(case: dict[str, Any]) -> None:
    bs, d, lens, g = case["block_size"], case["dim"], case["lens"], gen(case["seed"])
    B = len(lens)
    needed = [-(-n // bs) for n in lens]
    num_blocks = sum(needed) + case["spare_blocks"]
    # Garbage everywhere: empty slots, spare blocks and padding must not leak into any row.
    key_cache = torch.randn(num_blocks, bs, d, generator=g) * 10
    value_cache = torch.randn(num_blocks, bs, d, generator=g) * 10
    ids = torch.randperm(num_blocks, generator=g).tolist()  # shuffled: no request's blocks are contiguous
    width = max(needed)
    tables, own_rows = [], []
    for n, nb in zip(lens, needed):
        own, ids = ids[:nb], ids[nb:]
        k, v = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        pos = torch.arange(n)
        key_cache[torch.tensor(own)[pos // bs], pos % bs] = k
        value_cache[torch.tensor(own)[pos // bs], pos % bs] = v
        pad = torch.randint(0, num_blocks, (width - nb,), generator=g).tolist()  # any block: someone else's
        tables.append(own + pad)
        own_rows.append((k, v))
    query = torch.randn(B, d, generator=g)
    new_k, new_v = torch.randn(B, d, generator=g), torch.randn(B, d, generator=g)
    new = (new_k, new_v) if case["with_new"] else (None, None)
    out, probs = paged_attention(query, key_cache, value_cache, torch.tensor(tables), torch.tensor(lens), *new)
    S = width * bs
    assert out.shape == (B, d) and probs.shape == (B, S + int(case["with_new"]))
    for b, (k, v) in enumerate(own_rows):
        if case["with_new"]:
            k, v = torch.cat([k, new_k[b : b + 1]]), torch.cat([v, new_v[b : b + 1]])
        ref_out, ref_probs = scaled_dot_product_attention(query[b : b + 1], k, v)
        torch.testing.assert_close(out[b : b + 1], ref_out, **TOL)
        n = lens[b]
        torch.testing.assert_close(probs[b, :n], ref_probs[0, :n], **TOL)
        assert bool((probs[b, n:S] == 0).all())
        if case["with_new"]:
            torch.testing.assert_close(probs[b, S], ref_probs[0, n], **TOL)


# ---------------------------------------------------------------- forward_fused == decode + ragged prefill


def filled_caches(model: TinyLLM, lens: list[int], kind: str, bs: int = 3) -> list[BaseKVCache]:
    """Caches holding real K/V rows; on a shared pool their appends interleave, so blocks are scattered."""
    pool = BlockPool(sum(-(-n // bs) for n in lens) + 2, bs, model.dim)
    if kind == "shared":
        caches: list[BaseKVCache] = [PagedKVCache(bs, pool=pool) for _ in lens]
    elif kind == "paged":
        caches = [PagedKVCache(bs) for _ in lens]
    else:
        caches = [DenseKVCache(initial_capacity=2) for _ in lens]
    kv = [
        model.forward_prefill_dense(torch.randn(n, model.dim, generator=gen(100 + i)))[1:] for i, n in enumerate(lens)
    ]
    for pos in range(0, max(lens), 2):  # round robin, two rows at a time
        for cache, (k, v), n in zip(caches, kv, lens):
            if pos < n:
                cache.append(k[pos : pos + 2], v[pos : pos + 2])
    return caches


FUSED_CASES = {
    # name: (decode cache lengths, prefill chunks as (start, length))
    "decode only": ([1, 5, 9, 2], []),
    "prefill only": ([], [(0, 4), (0, 1), (0, 6)]),
    "prefill on cached prefixes": ([], [(3, 2), (0, 4), (7, 1), (5, 5)]),
    "decode and prefill": ([4, 1, 7], [(0, 3), (2, 4), (6, 1)]),
}


@pytest.mark.parametrize(
    ("case", "kind"),
    [(case, kind) for case, (decode, _) in FUSED_CASES.items()
     for kind in (["shared", "paged", "dense"] if decode else ["-"])],
)
def test_forward_fused_equals_decode_and_ragged_prefill_run_separately(case: str, kind: str) -> None:
    model = make_model(D, seed=3)
    decode_lens, chunks = FUSED_CASES[case]
    g = gen(7)
    # Decode rows: a token each, over its own cache.
    caches = filled_caches(model, decode_lens, kind) if decode_lens else []
    decode_tokens = torch.randn(len(decode_lens), D, generator=g)
    # Prefill rows: chunk [s, s + n) of a fresh sequence, its cached prefix [0, s) as past K/V.
    seqs = [torch.randn(s + n, D, generator=g) for s, n in chunks]
    prefill_tokens = torch.cat([seq[s:] for seq, (s, _) in zip(seqs, chunks)]) if chunks else None
    prefixes = [model.forward_prefill_dense(seq[:s])[1:] for seq, (s, _) in zip(seqs, chunks) if s > 0]
    past = (torch.cat([k for k, _ in prefixes]), torch.cat([v for _, v in prefixes])) if prefixes else None
    mask = (
        cached_prefix_mask(torch.tensor([s for s, _ in chunks]), torch.tensor([n for _, n in chunks]))
        if chunks else None
    )

    parts = [t for t in (decode_tokens if decode_lens else None, prefill_tokens) if t is not None]
    decode_kv = decode_inputs(caches, model.device) if caches else None
    out, k, v = model.forward_fused(torch.cat(parts), decode_kv, mask, past)

    ref = [model.forward_decode(tok, cache) for tok, cache in zip(decode_tokens, caches)]
    if prefill_tokens is not None and mask is not None:
        ref.append(model.forward_prefill_ragged(prefill_tokens, mask, past))
    for got, want in zip((out, k, v), zip(*ref)):
        torch.testing.assert_close(got, torch.cat(want), **TOL)
    # And the prefill rows are what one-shot dense prefill of each whole sequence gives.
    B = len(decode_lens)
    for seq, (s, _n), rows in zip(seqs, chunks, torch.split(out[B:], [n for _, n in chunks])):
        torch.testing.assert_close(rows, model.forward_prefill_dense(seq)[0][s:], **TOL)


def test_forward_fused_sees_hooks_of_both_phases_with_the_separate_probabilities() -> None:
    model = make_model(D, seed=3)
    caches = filled_caches(model, [3, 6], "shared")
    tokens = torch.randn(2 + 3, D, generator=gen(1))
    mask = cached_prefix_mask(torch.tensor([0]), torch.tensor([3]))
    seen: list[tuple[str, torch.Tensor]] = []

    class Hook:
        def on_attention(self, phase: str, weights: torch.Tensor) -> None:
            seen.append((phase, weights))

    model.forward_fused(tokens, decode_inputs(caches, model.device), mask, attention_hooks=[Hook()])
    assert [phase for phase, _ in seen] == ["decode", "prefill"]
    _, prefill_probs = scaled_dot_product_attention(*model.project_qkv(tokens[2:]), mask)
    torch.testing.assert_close(seen[1][1], prefill_probs, **TOL)
    assert seen[0][1].shape[0] == 2
    torch.testing.assert_close(seen[0][1].sum(-1), torch.ones(2), **TOL)


# ---------------------------------------------------------------- decode_inputs


def test_decode_inputs_reads_a_shared_pool_in_place() -> None:
    model = make_model(D)
    caches = filled_caches(model, [5, 1, 8], "shared")
    pool = caches[0].pool  # type: ignore[attr-defined]
    got = decode_inputs(caches, model.device)
    assert got.key_cache is pool.key_cache and got.value_cache is pool.value_cache
    tables = [c.block_table for c in caches]  # type: ignore[attr-defined]
    assert tables == [[0, 3], [1], [2, 4, 5]]  # round-robin appends interleave the blocks
    assert got.block_tables.tolist() == [[0, 3, 0], [1, 0, 0], [2, 4, 5]]
    assert got.block_tables.dtype == torch.int64 and got.context_lens.tolist() == [5, 1, 8]
    assert got.num_rows == 3


@pytest.mark.parametrize(
    "kinds",
    [("dense", "dense", "dense"), ("paged", "paged", "paged"), ("shared", "dense", "shared"),
     ("dense", "shared", "paged")],
)
def test_decode_inputs_copies_other_caches_into_one_padded_tensor(kinds: tuple[str, ...]) -> None:
    model = make_model(D)
    lens = [4, 7, 2]
    pool = BlockPool(8, 3, D)
    by_kind: dict[str, Callable[[], BaseKVCache]] = {
        "dense": DenseKVCache, "paged": lambda: PagedKVCache(3), "shared": lambda: PagedKVCache(3, pool=pool)
    }
    caches = [by_kind[kind]() for kind in kinds]
    for i, (cache, n) in enumerate(zip(caches, lens)):
        cache.append(torch.randn(n, D, generator=gen(i)), torch.randn(n, D, generator=gen(10 + i)))
    got = decode_inputs(caches, model.device)
    assert got.key_cache.shape == got.value_cache.shape == (1, 3, 7, D)  # one layer of whole rows
    assert got.key_cache is not pool.key_cache
    assert got.block_tables.tolist() == [[0], [1], [2]] and got.context_lens.tolist() == lens
    for b, (cache, n) in enumerate(zip(caches, lens)):
        k, v = cache.get_kv()
        torch.testing.assert_close(got.key_cache[0, b, :n], k, rtol=0, atol=0)
        torch.testing.assert_close(got.value_cache[0, b, :n], v, rtol=0, atol=0)
        assert bool((got.key_cache[0, b, n:] == 0).all())
    got.key_cache.fill_(7.0)  # a copy: writing it leaves every cache alone
    for i, cache in enumerate(caches):
        torch.testing.assert_close(cache.get_kv()[0], torch.randn(lens[i], D, generator=gen(i)), rtol=0, atol=0)


# ---------------------------------------------------------------- the scheduler on both executors


def shared_requests(pool: BlockPool, shapes: list[tuple[int, int]], dim: int = D) -> list[Request]:
    return [
        make_request(f"r{i}", L, n, dim, PagedKVCache(pool.block_size, pool=pool), seed=i)
        for i, (L, n) in enumerate(shapes)
    ]


SHAPES = [(5, 4), (1, 6), (9, 2), (3, 0), (4, 5), (2, 1)]


@pytest.mark.parametrize("cache", ["shared", "dense"])
def test_fused_and_split_give_the_same_tokens_and_count_their_model_calls(cache: str) -> None:
    model = make_model(D)
    runs: dict[str, tuple[list[Request], list[dict[str, Any]], int]] = {}
    for executor in ("fused", "split"):
        pool = BlockPool(64, 3, D)
        reqs = (
            shared_requests(pool, SHAPES) if cache == "shared"
            else [make_request(f"r{i}", L, n, D, seed=i) for i, (L, n) in enumerate(SHAPES)]
        )
        sched = Scheduler(model, 5, 3, executor=executor)
        for r in reqs:
            sched.add_request(r)
        history = sched.run_until_complete()
        runs[executor] = (reqs, history, sched.executor.num_model_calls)
    (fused_reqs, fused_hist, fused_calls), (split_reqs, split_hist, split_calls) = runs["fused"], runs["split"]
    for f, s in zip(fused_reqs, split_reqs):
        assert len(f.generated_tokens) == len(s.generated_tokens) == f.max_new_tokens
        if f.max_new_tokens:
            torch.testing.assert_close(torch.stack(f.generated_tokens), torch.stack(s.generated_tokens), **TOL)
        assert_oracle(model, f, check_cache=cache != "shared")
    assert [(h["decode_tokens"], h["prefill_tokens"]) for h in fused_hist] == [
        (h["decode_tokens"], h["prefill_tokens"]) for h in split_hist
    ]
    assert fused_calls == sum(h["total_tokens"] > 0 for h in fused_hist)
    assert split_calls == sum(h["prefill_tokens"] > 0 for h in split_hist) + sum(h["decode_tokens"] for h in split_hist)
    assert split_calls > fused_calls


@pytest.mark.parametrize("executor", ["fused", "split"])
def test_one_step_mixing_every_cache_kind_matches_the_oracle(executor: str) -> None:
    model = make_model(D)
    pool_a, pool_b = BlockPool(32, 2, D), BlockPool(32, 5, D)
    caches: list[BaseKVCache] = [
        PagedKVCache(2, pool=pool_a), DenseKVCache(), PagedKVCache(5, pool=pool_b), PagedKVCache(3),
        PagedKVCache(2, pool=pool_a), PagedKVCache(5, pool=pool_b),
    ]
    reqs = [make_request(f"r{i}", 2 + i, 6 - i, D, cache, seed=i) for i, cache in enumerate(caches)]
    sched = Scheduler(model, 16, 4, executor=executor)
    for r in reqs:
        sched.add_request(r)
    sched.run_until_complete()
    for r, cache in zip(reqs, caches):
        assert_oracle(model, r, check_cache=not getattr(cache, "shares_pool", False))
    assert pool_a.num_used_blocks == pool_b.num_used_blocks == 0


def blocks_of(sched: Scheduler) -> int:
    tables = [r.kv_cache.block_table for r in sched.active if isinstance(r.kv_cache, PagedKVCache)]
    assert len(tables) == len(sched.active)
    return sum(len(t) for t in tables)


@pytest.mark.parametrize("executor", ["fused", "split"])
def test_a_request_gives_its_blocks_back_the_step_it_finishes(executor: str) -> None:
    model = make_model(D)
    pool = BlockPool(40, 3, D)
    reqs = shared_requests(pool, SHAPES)
    sched = Scheduler(model, 6, 4, executor=executor)
    for r in reqs:
        sched.add_request(r)
    finished_seen = 0
    while sched.active:
        stats = sched.step()
        finished_seen += stats["finished_requests"]
        assert pool.num_used_blocks == blocks_of(sched)
        assert pool.num_tokens == sum(len(r.kv_cache) for r in sched.active)
        for r in sched.active:
            assert len(r.kv_cache.block_table) == -(-len(r.kv_cache) // 3)  # type: ignore[attr-defined]
        for r in reqs:
            if r.finished:
                assert len(r.kv_cache) == 0 and r.kv_cache.block_table == []  # type: ignore[attr-defined]
    assert finished_seen == len(SHAPES) and set(pool.ref_counts) == {0}
    for r in reqs:
        assert_oracle(model, r, check_cache=False)


def snapshot(sched: Scheduler, reqs: list[Request], pool: BlockPool) -> tuple[Any, ...]:
    per_request = [
        (r.prefill_pos, len(r.generated_tokens), r.finished, len(r.kv_cache), list(r.kv_cache.block_table))  # type: ignore[attr-defined]
        for r in reqs
    ]
    return (
        per_request, [r.req_id for r in sched.active], sched.step_id, sched.num_finished,
        sched.executor.num_model_calls, pool.stats(), list(pool.ref_counts), list(pool.free_block_ids),
        pool.key_cache.clone(), pool.value_cache.clone(),
    )


def assert_unchanged(before: tuple[Any, ...], after: tuple[Any, ...]) -> None:
    assert before[:-2] == after[:-2]
    torch.testing.assert_close(before[-2], after[-2], rtol=0, atol=0)
    torch.testing.assert_close(before[-1], after[-1], rtol=0, atol=0)


@pytest.mark.parametrize("executor", ["fused", "split"])
def test_a_request_waits_for_blocks_and_a_hand_made_plan_that_overflows_is_refused(executor: str) -> None:
    model = make_model(D)
    pool = BlockPool(2, 2, D)
    reqs = shared_requests(pool, [(2, 2), (4, 1)])  # alone, each fits in 2 blocks; together they need 3
    sched = Scheduler(model, 8, 8, executor=executor)
    for r in reqs:
        sched.add_request(r)
    plan = sched.schedule()
    assert [r.req_id for r in plan.admitted] == ["r0"] and plan.skipped == (("r1", "no_blocks"),)
    both = StepPlan(0, (), tuple(PrefillChunk(r, 0, r.prompt_len) for r in reqs), tuple(reqs))
    with pytest.raises(CBLabMemoryError, match=r"step 0 needs 3 new KV blocks but the shared pool has 2 free"):
        check_blocks(both)
    result = sched.executor.run(both)  # compute reads only
    before = snapshot(sched, reqs, pool)
    with pytest.raises(CBLabMemoryError):  # commit checks before its first write: nothing changes
        sched.commit(both, result)
    assert_unchanged(before, snapshot(sched, reqs, pool))
    assert list(sched.waiting) == reqs and sched.running == []
    while sched.active:
        check_blocks(sched.schedule())  # the planner keeps to the free blocks
        sched.step()
        assert pool.num_used_blocks == blocks_of(sched)
    for r in reqs:
        assert_oracle(model, r, check_cache=False)
    assert pool.num_used_blocks == 0


@pytest.mark.parametrize("executor", ["fused", "split"])
def test_a_decode_short_of_blocks_preempts_itself_and_recomputes_later(executor: str) -> None:
    model = make_model(D)
    pool = BlockPool(4, 2, D)
    other = Scheduler(model, 8, 8, executor=executor)  # a second scheduler on the same pool
    (b,) = shared_requests(pool, [(3, 2)])
    other.add_request(b)
    other.step()  # b holds 2 blocks and waits to decode (its next row fits in its last block)
    sched = Scheduler(model, 8, 8, executor=executor)
    a = make_request("a", 3, 3, D, PagedKVCache(2, pool=pool), seed=11)
    sched.add_request(a)
    sched.step()  # prefill: 3 rows, 2 blocks, the pool is full
    sched.step()  # decode: row 4 fits in a's second block
    stats = sched.step()  # row 5 needs a block, none is free and nobody else runs here: a preempts itself
    assert stats["preempted_requests"] == 1 and a.num_preemptions == 1 and len(a.kv_cache) == 0
    assert list(sched.waiting) == [a] and len(a.generated_tokens) == 2 and pool.num_free_blocks == 2
    assert sched.schedule().skipped == (("a", "no_blocks"),)  # its recompute (5 rows) needs 3 blocks
    other.run_until_complete()  # b finishes and gives its 2 blocks back
    assert b.finished and pool.num_free_blocks == 4
    sched.run_until_complete()
    for r in (a, b):
        assert r.finished
        assert_oracle(model, r, check_cache=False)
    assert pool.num_used_blocks == 0 and pool.num_tokens == 0


def test_check_blocks_ignores_private_and_growable_caches() -> None:
    model = make_model(D)
    growable = BlockPool(1, 2, D, growable=True)
    reqs = [
        make_request("dense", 9, 2, D, "dense"), make_request("paged", 9, 2, D, "paged", 2),
        make_request("grow", 9, 2, D, PagedKVCache(2, pool=growable)),
    ]
    sched = Scheduler(model, 32, 32)
    for r in reqs:
        sched.add_request(r)
    check_blocks(sched.schedule())  # 5 blocks wanted from a 1-block growable pool: fine
    sched.run_until_complete()
    for r in reqs:
        assert_oracle(model, r, check_cache=r.req_id != "grow")


def test_unknown_executor_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"executor must be one of \['fused', 'split'\], got 'bogus'"):
        Scheduler(make_model(D), executor="bogus")


def test_a_cache_on_a_shared_pool_of_another_dim_is_refused() -> None:
    sched = Scheduler(make_model(D))
    pool = BlockPool(8, 2, D * 2)
    req = make_request("a", 3, 2, D, PagedKVCache(2, pool=pool))
    with pytest.raises(SchedulerError, match=rf"cache dim {D * 2}\) but the model has dim {D}"):
        sched.add_request(req)
    assert sched.active == [] and pool.num_used_blocks == 0


# ---------------------------------------------------------------- CUDA


def run_on(device: torch.device, executor: str, cache: str = "shared") -> tuple[list[Request], BlockPool]:
    model = make_model(D).to(device)
    pool = BlockPool(32, 3, D, device=device)

    def new_cache() -> BaseKVCache:
        if cache == "dense":
            return DenseKVCache(device)
        return PagedKVCache(3, device, pool=pool if cache == "shared" else None)

    cpu_reqs = [make_request(f"r{i}", L, n, D, seed=i) for i, (L, n) in enumerate(SHAPES)]
    reqs = [Request(r.req_id, r.prompt.to(device), r.max_new_tokens, new_cache()) for r in cpu_reqs]
    sched = Scheduler(model, 5, 3, executor=executor)
    for r in reqs:
        sched.add_request(r)
    sched.run_until_complete()
    return reqs, pool


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cache", ["dense", "paged", "shared"])
@pytest.mark.parametrize("executor", ["fused", "split"])
def test_a_run_on_cuda_matches_the_cpu_run(executor: str, cache: str) -> None:
    cuda_reqs, cuda_pool = run_on(torch.device("cuda"), executor, cache)
    cpu_reqs, _ = run_on(torch.device("cpu"), executor, cache)
    assert cuda_pool.key_cache.is_cuda and cuda_pool.num_used_blocks == 0
    assert all(r.kv_cache.device.type == "cuda" for r in cuda_reqs)
    for g, c in zip(cuda_reqs, cpu_reqs):
        assert g.finished and len(g.generated_tokens) == len(c.generated_tokens) == c.max_new_tokens
        if c.max_new_tokens:
            assert all(t.is_cuda for t in g.generated_tokens)
            torch.testing.assert_close(torch.stack(g.generated_tokens).cpu(), torch.stack(c.generated_tokens),
                                       rtol=1e-4, atol=1e-4)


def test_paged_attention_with_a_workspace_matches_and_reuses_its_buffers() -> None:
    gen = torch.Generator().manual_seed(5)
    key_cache, value_cache = torch.randn(10, 3, D, generator=gen), torch.randn(10, 3, D, generator=gen)
    workspace = GatherWorkspace()
    for tables, lens in [([[4, 1], [7, 0]], [5, 6]), ([[2, 9]], [4]), ([[3, 8, 5], [1, 6, 0]], [9, 5])]:
        t, n = torch.tensor(tables), torch.tensor(lens)
        q, k_new, v_new = (torch.randn(len(lens), D, generator=gen) for _ in range(3))
        expected = paged_attention(q, key_cache, value_cache, t, n, k_new, v_new)
        got = paged_attention(q, key_cache, value_cache, t, n, k_new, v_new, workspace)
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
    # blocks in use (padding is never gathered): 2 + 2, then 2 (fits), then 3 + 2 (grows to max(5, 2 * 4) = 8)
    assert {name: buf.shape[0] for name, buf in workspace.buffers.items()} == {"keys": 8, "values": 8}


def test_paged_attention_gathers_only_the_blocks_in_use() -> None:
    """A batch of a 9-row and a 2-row context: 3 + 1 blocks gathered, not 2 x 3 for a padded table."""
    gen = torch.Generator().manual_seed(6)
    key_cache, value_cache = torch.randn(10, 3, D, generator=gen), torch.randn(10, 3, D, generator=gen)
    tables, lens = torch.tensor([[3, 8, 5], [1, 0, 0]]), torch.tensor([9, 2])
    workspace = GatherWorkspace()
    q = torch.randn(2, D, generator=gen)
    out, probs = paged_attention(q, key_cache, value_cache, tables, lens, workspace=workspace)
    assert workspace.buffers["keys"].shape[0] == 4
    assert torch.equal(workspace.buffers["keys"], key_cache[torch.tensor([3, 8, 5, 1])])
    for b in range(2):  # each row equals dense attention over its own rows
        k = key_cache[tables[b]].reshape(-1, D)[: lens[b]]
        v = value_cache[tables[b]].reshape(-1, D)[: lens[b]]
        p = torch.softmax(k @ q[b] * D**-0.5, dim=0)
        torch.testing.assert_close(out[b], p @ v, **TOL)
        torch.testing.assert_close(probs[b, : lens[b]], p, **TOL)
        assert bool((probs[b, lens[b]:] == 0).all())
