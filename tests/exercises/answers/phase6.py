"""Phase 6 (docs/learning_materials/phase6_attention.md): your answers. Check: make check PHASE=6"""

from __future__ import annotations

import torch

# 1. One 6-row sequence through forward_prefill_ragged with an all-True mask (no masking at all):
#    the output rows (0..5) that still match forward_prefill_dense.
ROWS_THAT_MATCH_WITHOUT_MASK: list[int] | None = None

# 2. paged_attention for 3 decode rows, block_size 4, context_lens [5, 12, 1], block tables [3, 3]:
#    how many blocks it gathers, and how many a gather of the whole padded table would take.
BLOCKS_GATHERED: int | None = None
BLOCKS_IF_PADDED: int | None = None

# 3. A ragged batch of a, b, c (5, 6 and 4 rows, 15 keys), probabilities clamped to >= 1e-3 after the
#    softmax: the total probability that row b0 (b's first row) and row b5 (b's last) give to masked keys.
LEAK_B0: float | None = None
LEAK_B5: float | None = None

# 4. F.scaled_dot_product_attention(q, k, v, is_causal=True) with 3 queries and 8 keys:
#    how many keys each query row sees.
IS_CAUSAL_KEYS_SEEN: list[int] | None = None


# 4. Attention of the last q.shape[0] positions over k, v ([Nk, D]) with F.scaled_dot_product_attention,
#    equal to dense_causal_attention(q, k, v)[0].
def chunk_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError
