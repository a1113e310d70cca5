"""Checks the phase 5 exercises (docs/learning_materials/phase5_kv.md) against cb-lab itself."""

from __future__ import annotations

from types import ModuleType

import torch
from given import call, given
from helpers import make_model, make_request

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import DenseKVCache, PagedKVCache
from cb_lab.core.scheduler import Scheduler

PHASE = "phase5"


def rows(n: int, dim: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen), torch.randn(n, dim, generator=gen)


def test_phase5_paged_blocks(answers: ModuleType) -> None:
    req = make_request("a", 10, 4, 8, cache="paged", block_size=3)
    sched = Scheduler(make_model(8), max_tokens_per_step=8, prefill_chunk_size=4)
    sched.add_request(req)
    sched.run_until_complete()
    cache = req.kv_cache
    assert isinstance(cache, PagedKVCache) and cache.pool is not None
    assert given(answers, "PAGED_LEN_AT_FINISH") == len(cache)
    assert given(answers, "PAGED_BLOCKS_AT_FINISH") == cache.num_blocks_used
    assert given(answers, "PRIVATE_POOL_BLOCKS") == cache.pool.num_blocks


def test_phase5_block_tables(answers: ModuleType) -> None:
    pool = BlockPool(8, 3, 4)
    a, b = PagedKVCache(3, pool=pool), PagedKVCache(3, pool=pool)
    a.append(*rows(5))
    b.append(*rows(4))
    a.append(*rows(2))
    table_a = list(a.block_table)
    a.release()
    b.append(*rows(4))
    assert given(answers, "TABLE_A_BEFORE_RELEASE") == table_a
    assert given(answers, "TABLE_B_AT_END") == b.block_table


def test_phase5_dense_capacity(answers: ModuleType) -> None:
    one_by_one, at_once = DenseKVCache(), DenseKVCache()
    for i in range(40):
        one_by_one.append(*rows(1, seed=i))
    at_once.append(*rows(40))
    assert given(answers, "DENSE_CAPACITY_40_ONE_BY_ONE") == one_by_one.capacity
    assert given(answers, "DENSE_CAPACITY_40_AT_ONCE") == at_once.capacity


def test_phase5_slot_of(answers: ModuleType) -> None:
    dim = 2
    for block_size in (1, 3, 4):
        pool = BlockPool(32, block_size, dim)
        caches = [PagedKVCache(block_size, pool=pool) for _ in range(3)]
        # Interleaved appends, so block tables are not simply 0, 1, 2, ...; row p of cache c holds 100 * c + p.
        for c, n in [(0, 5), (1, 2), (2, 7), (0, 3), (1, 6), (2, 1), (0, 1)]:
            start = len(caches[c])
            k = (100.0 * c + torch.arange(start, start + n, dtype=torch.float32))[:, None].expand(n, dim)
            caches[c].append(k, -k)
        flat_k = pool.key_cache.view(-1, dim)  # [num_blocks * block_size, D]: what the cache's slots index
        for c, cache in enumerate(caches):
            for p in range(len(cache)):
                slot = call(answers, "slot_of", p, list(cache.block_table), block_size)
                assert isinstance(slot, int), f"slot_of should return an int, got {type(slot).__name__}"
                assert 0 <= slot < flat_k.shape[0], f"slot {slot} is outside the pool (block_size {block_size})"
                got = flat_k[slot, 0].item()
                assert got == 100 * c + p, (
                    f"block_size {block_size}, block_table {cache.block_table}: position {p} is not at slot {slot}"
                )
