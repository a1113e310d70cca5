"""Phase 9: reference answers (checked by make test with CB_LAB_EXERCISES=solutions)."""

from __future__ import annotations

import torch

CALLS_SPLIT = 6  # one forward_decode per decode token (5) + one ragged forward for both chunks
CALLS_FUSED = 1  # every row of the step in one forward_fused

WEIGHT_BYTES_SPLIT = 32 * 4 * 1024 * 1024 * 4  # 32 calls x 4 matrices x D*D floats x 4 bytes = 512 MiB
WEIGHT_BYTES_FUSED = 4 * 1024 * 1024 * 4  # one call: 16 MiB


def split_fused_output(
    rows: torch.Tensor, num_decode: int, chunk_lengths: list[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    # The flat batch is [decode rows | prefill rows], the chunks end to end in plan order.
    return rows[:num_decode], list(torch.split(rows[num_decode:], chunk_lengths))
