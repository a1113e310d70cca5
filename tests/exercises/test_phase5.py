"""Checks the phase 5 exercises (docs/learning_materials/phase5_kv.md) against cb-lab itself."""

from __future__ import annotations

from types import ModuleType

import torch
from given import call, check, given
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
    check(given(answers, "PAGED_LEN_AT_FINISH") == len(cache),
          "PAGED_LEN_AT_FINISH: the layout does not change the rows; phase 1 says what a finished request holds")
    check(given(answers, "PAGED_BLOCKS_AT_FINISH") == cache.num_blocks_used,
          "PAGED_BLOCKS_AT_FINISH: blocks of 3 rows, only the last one partly filled")
    check(given(answers, "PRIVATE_POOL_BLOCKS") == cache.pool.num_blocks,
          "PRIVATE_POOL_BLOCKS: a private pool starts with 4 blocks; read how BlockPool grows when it runs out")


def test_phase5_block_tables(answers: ModuleType) -> None:
    pool = BlockPool(8, 3, 4)
    a, b = PagedKVCache(3, pool=pool), PagedKVCache(3, pool=pool)
    a.append(*rows(5))
    b.append(*rows(4))
    a.append(*rows(2))
    table_a = list(a.block_table)
    a.release()
    b.append(*rows(4))
    check(given(answers, "TABLE_A_BEFORE_RELEASE") == table_a,
          "TABLE_A_BEFORE_RELEASE: allocate pops from the END of free_block_ids; follow the free list through "
          "a's, b's and a's appends (a new block only when the last one is full)")
    check(given(answers, "TABLE_B_AT_END") == b.block_table,
          "TABLE_B_AT_END: release pushes a's blocks back on the end of the free list, in what order? "
          "and which come off first?")


def test_phase5_dense_capacity(answers: ModuleType) -> None:
    one_by_one, at_once = DenseKVCache(), DenseKVCache()
    for i in range(40):
        one_by_one.append(*rows(1, seed=i))
    at_once.append(*rows(40))
    rule = "the first buffer holds max(initial_capacity, rows); a full one grows to max(needed, 2 * capacity)"
    check(given(answers, "DENSE_CAPACITY_40_ONE_BY_ONE") == one_by_one.capacity,
          f"DENSE_CAPACITY_40_ONE_BY_ONE: {rule}; follow it one row at a time")
    check(given(answers, "DENSE_CAPACITY_40_AT_ONCE") == at_once.capacity, f"DENSE_CAPACITY_40_AT_ONCE: {rule}")


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
                check(isinstance(slot, int), f"slot_of should return an int, got {type(slot).__name__}")
                check(0 <= slot < flat_k.shape[0], f"slot {slot} is outside the pool (block_size {block_size})")
                check(flat_k[slot, 0].item() == 100 * c + p,
                      f"slot_of({p}, {cache.block_table}, {block_size}): position {p} is not at slot {slot}; which "
                      "entry of the block table holds it, and at which offset in that block?")
