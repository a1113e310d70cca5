"""Phase 14: reference answers (checked by make test with CB_LAB_EXERCISES=solutions)."""

from __future__ import annotations

# A key and a value per layer, per KV head, head_dim numbers each: 2 x 30 x 3 x 64 = 11,520 numbers, 4 bytes each
# in float32, 2 in bfloat16. (The 9 query heads do not count: queries are not cached.)
KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4  # 46,080: 45 KiB
KV_BYTES_PER_TOKEN_BF16 = 2 * 30 * 3 * 64 * 2  # 23,040

# 64 MiB // (46,080 bytes x 16 tokens) = 67,108,864 // 737,280 = 91 blocks (1,456 tokens).
POOL_BLOCKS_DEFAULT = 91
# The cache holds prompt + generated - 1 rows: the last token is returned, never fed back, so its K/V is never
# computed. 45 + 48 - 1 = 92 rows -> 6 blocks of 16; 40 + 9 - 1 = 48 rows -> exactly 3 (not 4).
BLOCKS_45_PROMPT_48_TOKENS = 6
BLOCKS_40_PROMPT_9_TOKENS = 3

# Only full blocks are cached: 40 shared tokens are 2 full blocks (32 tokens); the third block mixes shared and own
# tokens. A block is cached after the step that fills it, so the first request computes them and each of the 4
# later ones takes them: 4 x 32. Arriving together, all five are admitted before anything is cached: none saves.
SAVED_ONE_PER_STEP = 128
SAVED_ALL_AT_ONCE = 0


# llama.cpp rotates neighbour pairs (2j, 2j + 1), HF pairs j with j + d/2. Its converter put HF's row h * d/2 + j
# (h = 0 or 1) at stored row 2j + h, so stored row r is HF's row (r % 2) * d/2 + r // 2.
def hf_row(stored_row: int, head_dim: int) -> int:
    return (stored_row % 2) * (head_dim // 2) + stored_row // 2
