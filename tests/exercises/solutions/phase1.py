"""Phase 1: reference answers (checked by make test with CB_LAB_EXERCISES=solutions)."""

from __future__ import annotations

import torch

CHUNKS_14_BY_4 = [(0, 4), (4, 8), (8, 12), (12, 14)]  # the last chunk is what is left

CACHE_LEN_AFTER_PREFILL = 10  # one row per prompt position
CACHE_LEN_AT_FINISH = 14  # L + max_new_tokens - 1: the last token is never fed back


def chunk_mask(start: int, end: int) -> torch.Tensor:
    q_pos = torch.arange(start, end)[:, None]  # query positions s..e-1
    k_pos = torch.arange(end)[None, :]  # key positions 0..e-1
    return k_pos <= q_pos  # lower-right aligned causal mask


CHUNK_THAT_STILL_MATCHES = 0  # the first chunk has no cached prefix to forget
