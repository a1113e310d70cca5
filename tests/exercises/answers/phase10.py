"""Phase 10 (docs/learning_materials/phase10_block_pool.md): your answers. Check: make check PHASE=10"""

from __future__ import annotations

from collections.abc import Sequence

# 1. BlockPool(6, 4, 8); budget 16, chunk 16; a (prompt 6, 2 tokens) and b (prompt 5, 4 tokens) at step 0,
#    c (prompt 7, 2 tokens) added just before step 2: free blocks right after step 1, c's block table after step 2.
FREE_BLOCKS_AFTER_STEP_1: int | None = None
C_TABLE: list[int] | None = None


# 2. Empty slots of a cache that holds num_rows rows in blocks of block_size.
def unused_slots(num_rows: int, block_size: int) -> int:
    raise NotImplementedError


# 3. Blocks a step takes from the free list when cache i (holding cache_lens[i] rows) gets new_rows[i] more rows.
def new_blocks(cache_lens: Sequence[int], new_rows: Sequence[int], block_size: int) -> int:
    raise NotImplementedError
