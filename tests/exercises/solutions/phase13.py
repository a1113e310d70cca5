"""Phase 13: reference answers (checked by make test with CB_LAB_EXERCISES=solutions)."""

from __future__ import annotations

# a cached blocks 0, 1, 2 (rows 0..11; rows 12, 13 are no full block). b shares rows 0..9: blocks 0 and 1
# (block 2 holds b's own rows 10, 11). c may use (14 - 1) // 4 = 3 blocks: all three. d (12 rows) may use
# (12 - 1) // 4 = 2: its third block holds its last row, which it computes itself.
HIT_ROWS = {"b": 8, "c": 12, "d": 8}

# The prompt once (10 rows), then each of the 2 forks recomputes row 9. The forks share rows 0..8: block 2 holds
# row 8 of theirs and rows 8, 9 of the parent's; each fork's write of row 9 copies it first.
PREFILL_ROWS_N3 = 12
COPIES_N3 = 2
COPIES_N3_9_ROWS = 0  # the forks share rows 0..7, two full blocks; their row 8 goes into a block of their own

# a's 2 blocks, then b's, join the LRU list as they finish. c needs 4: the 2 free ones, then the least
# recently used cached ones: a's. Together, a finds nothing; b may use (8 - 1) // 4 = 1 block (4 rows), adopted
# before any allocation of the step (so a's allocations cannot evict it).
EVICTED_FIRST = "a"
HIT_ROWS_A_AGAIN = 0
HIT_ROWS_B_AGAIN = 4

# 16 tokens = 2 full blocks of the system prompt. Requests arriving in step 0 compute them; the six admitted
# later take both: 6 x 16.
SAVED_SYSTEM_LEN_16 = 96
