"""Phase 5 (docs/learning_materials/phase5_kv.md): your answers. Check: make check PHASE=5"""

from __future__ import annotations

# 1. A request with a 10-row prompt and max_new_tokens=4, PagedKVCache(block_size=3) with its private pool:
#    at finish, the rows its cache holds, the blocks in its block table, and the blocks of its private pool.
PAGED_LEN_AT_FINISH: int | None = None
PAGED_BLOCKS_AT_FINISH: int | None = None
PRIVATE_POOL_BLOCKS: int | None = None

# 2. Caches a and b on one BlockPool(8, 3, dim): a gets 5 rows, b 4 rows, a 2 more rows.
#    Then a.release() and b gets 4 more rows. a's block table before the release, b's at the end.
TABLE_A_BEFORE_RELEASE: list[int] | None = None
TABLE_B_AT_END: list[int] | None = None

# 3. DenseKVCache() (initial_capacity 16): its capacity after 40 appends of one row each,
#    and after one append of 40 rows.
DENSE_CAPACITY_40_ONE_BY_ONE: int | None = None
DENSE_CAPACITY_40_AT_ONCE: int | None = None


# 4. The flat pool slot (block_id * block_size + offset) that holds token position `position`.
def slot_of(position: int, block_table: list[int], block_size: int) -> int:
    raise NotImplementedError
