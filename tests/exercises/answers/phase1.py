"""Phase 1 (docs/learning_materials/phase1_prefill.md): your answers. Check: make check PHASE=1"""

from __future__ import annotations

import torch

# 1. The (start, end) chunks of a 14-row prompt prefilled with prefill_chunk_size=4.
CHUNKS_14_BY_4: list[tuple[int, int]] | None = None

# 2. Cache rows of a request with a 10-row prompt and max_new_tokens=5: after prefill, at finish.
CACHE_LEN_AFTER_PREFILL: int | None = None
CACHE_LEN_AT_FINISH: int | None = None


# 3. The [end - start, end] bool mask of a chunk covering positions [start, end).
def chunk_mask(start: int, end: int) -> torch.Tensor:
    raise NotImplementedError


# 4. The start position of the chunk that still matches the oracle without its cached prefix.
CHUNK_THAT_STILL_MATCHES: int | None = None
