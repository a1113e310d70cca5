"""Phase 10: reference answers (checked by make test with CB_LAB_EXERCISES=solutions)."""

from __future__ import annotations

from collections.abc import Sequence

FREE_BLOCKS_AFTER_STEP_1 = 4  # a finished in step 1 and gave [0, 1] back; b holds [2, 3]
C_TABLE = [1, 0]  # free pushes 0 then 1 on the end of the free list; allocate pops 1 first


def unused_slots(num_rows: int, block_size: int) -> int:
    return -num_rows % block_size  # only the last block can be partly filled


def new_blocks(cache_lens: Sequence[int], new_rows: Sequence[int], block_size: int) -> int:
    # Blocks held after minus before: a cache takes a block only when its last one is full.
    return sum(-(-(n + k) // block_size) - -(-n // block_size) for n, k in zip(cache_lens, new_rows))
