"""Phase 6: reference answers (checked by make test with CB_LAB_EXERCISES=solutions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ROWS_THAT_MATCH_WITHOUT_MASK = [5]  # the last row sees every key with or without the causal rule

BLOCKS_GATHERED = 6  # ceil(5/4) + ceil(12/4) + ceil(1/4) = 2 + 3 + 1: only the blocks in use
BLOCKS_IF_PADDED = 9  # 3 rows x 3 table entries

LEAK_B0 = 0.014  # b0 sees 1 key of 15: 14 masked keys at 1e-3 each
LEAK_B5 = 0.009  # b5 sees b0..b5, 6 keys: 9 masked keys at 1e-3 each

IS_CAUSAL_KEYS_SEEN = [1, 2, 3]  # upper-left: query i sees keys 0..i, as if the cached rows were not there


def chunk_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q_len, k_len = q.shape[0], k.shape[0]
    mask = torch.ones(q_len, k_len, dtype=torch.bool).tril(diagonal=k_len - q_len)  # lower-right; True = attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
