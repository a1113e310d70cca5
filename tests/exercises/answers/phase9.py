"""Phase 9 (docs/learning_materials/phase9_fused_step.md): your answers. Check: make check PHASE=9"""

from __future__ import annotations

import torch

# 1. Model calls of one step with 5 decode tokens and two 4-row prefill chunks: split, fused.
CALLS_SPLIT: int | None = None
CALLS_FUSED: int | None = None

# 2. Bytes of weights read by one step of TinyLLM(1024) that decodes 32 requests (no prefill): split, fused.
WEIGHT_BYTES_SPLIT: int | None = None
WEIGHT_BYTES_FUSED: int | None = None


# 3. Split an [N, D] output of forward_fused into the decode rows [num_decode, D] and one
#    [length, D] tensor per prefill chunk (in plan order).
def split_fused_output(
    rows: torch.Tensor, num_decode: int, chunk_lengths: list[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    raise NotImplementedError
