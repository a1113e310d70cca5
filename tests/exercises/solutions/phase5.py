"""Phase 5: reference answers (checked by make test with CB_LAB_EXERCISES=solutions)."""

from __future__ import annotations

PAGED_LEN_AT_FINISH = 13  # L + max_new_tokens - 1 = 10 + 4 - 1: a private cache stays readable
PAGED_BLOCKS_AT_FINISH = 5  # ceil(13 / 3); the last block holds one row and two empty slots
PRIVATE_POOL_BLOCKS = 8  # it starts with 4 blocks and doubles when the fifth is needed

TABLE_A_BEFORE_RELEASE = [0, 1, 4]  # 0 and 1 for its first 5 rows; 2 and 3 went to b; its 7th row needs a third
TABLE_B_AT_END = [2, 3, 4]  # free() appends 0, 1, 4 to the free list and allocate() pops the last: 4

DENSE_CAPACITY_40_ONE_BY_ONE = 64  # 16 -> 32 (row 17) -> 64 (row 33)
DENSE_CAPACITY_40_AT_ONCE = 40  # the first buffer is max(initial_capacity, rows needed)


def slot_of(position: int, block_table: list[int], block_size: int) -> int:
    block = block_table[position // block_size]  # which block of the pool
    return block * block_size + position % block_size  # plus the offset inside it
