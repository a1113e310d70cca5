"""Checks the phase 10 exercises (docs/learning_materials/phase10_block_pool.md) against cb-lab itself."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
from given import call, check, given
from helpers import make_model, make_request

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import PagedKVCache, append_batch
from cb_lab.core.scheduler import Scheduler

PHASE = "phase10"


def test_phase10_who_gets(answers: ModuleType) -> None:
    pool = BlockPool(6, 4, 8)
    sched = Scheduler(make_model(8), max_tokens_per_step=16, prefill_chunk_size=16)
    specs = [("a", 6, 2), ("b", 5, 4), ("c", 7, 2)]  # (req_id, prompt_len, max_new_tokens)
    a, b, c = (make_request(r, n, k, 8, PagedKVCache(4, pool=pool)) for r, n, k in specs)
    sched.add_request(a)
    sched.add_request(b)
    sched.step()
    sched.step()
    assert a.finished
    check(given(answers, "FREE_BLOCKS_AFTER_STEP_1") == pool.num_free_blocks,
          "FREE_BLOCKS_AFTER_STEP_1: which requests hold blocks after step 1, and how many rows each (block_size "
          "rows a block)? what happens to the blocks of a request that finishes in a step?")
    sched.add_request(c)
    sched.step()
    check(given(answers, "C_TABLE") == c.kv_cache.block_table,
          "C_TABLE: free pushes a freed block on the END of free_block_ids and allocate pops from the end: the "
          "block freed last is handed out first")


def test_phase10_unused_slots(answers: ModuleType) -> None:
    for block_size in (1, 3, 4, 16):
        for num_rows in (0, 1, 2, 3, 4, 5, 15, 16, 17, 33):
            pool = BlockPool(8, block_size, 4, growable=True)
            cache = PagedKVCache(block_size, pool=pool)
            if num_rows:
                cache.append(torch.zeros(num_rows, 4), torch.zeros(num_rows, 4))
            want = pool.stats()["unused_slots"]
            check(call(answers, "unused_slots", num_rows, block_size) == want,
                  f"unused_slots({num_rows}, {block_size}): only the last block can have empty slots (and no "
                  "rows take no block at all)")


@pytest.mark.parametrize("cache_lens, new_rows, block_size", [
    ([4, 7, 8, 0], [1, 1, 1, 5], 4), ([0, 0], [3, 4], 4), ([3, 3, 3], [1, 1, 1], 3), ([15, 16, 17], [2, 1, 16], 16),
    ([5], [1], 1),
])
def test_phase10_new_blocks(answers: ModuleType, cache_lens: list[int], new_rows: list[int], block_size: int) -> None:
    pool = BlockPool(64, block_size, 4)
    caches = [PagedKVCache(block_size, pool=pool) for _ in cache_lens]
    for cache, n in zip(caches, cache_lens):
        if n:
            cache.append(torch.zeros(n, 4), torch.zeros(n, 4))
    free_before = pool.num_free_blocks
    append_batch([(cache, torch.zeros(k, 4), torch.zeros(k, 4)) for cache, k in zip(caches, new_rows)])  # one step
    taken = free_before - pool.num_free_blocks
    check(call(answers, "new_blocks", cache_lens, new_rows, block_size) == taken,
          f"new_blocks({cache_lens}, {new_rows}, {block_size}): per cache, the blocks it holds after the append "
          "minus the blocks it held before")
