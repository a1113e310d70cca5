"""Ragged attention: one attention call over many requests' tokens, kept apart by a mask.

The tokens of several requests sit in one flat batch (see ``core/batch_builder.py``).
The mask says which query row may see which key row: same request, not in the future.
Keys may include rows that are not in the batch (a request's cached prefix, for a
chunked prefill), as long as the mask has a column for each.

Shapes: ``q [N, D]``, ``k, v [Nk, D]`` with ``Nk >= N``, ``ragged_mask [N, Nk]`` bool.
"""

from __future__ import annotations

import torch

from cb_lab.attention.dense_attention import scaled_dot_product_attention
from cb_lab.exceptions import ModelError

__all__ = ["ragged_attention"]


def ragged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ragged_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention over a ragged batch; returns ``(out [N, D], probs [N, Nk])``."""
    expected = (q.shape[0], k.shape[0])
    if ragged_mask.dtype != torch.bool or tuple(ragged_mask.shape) != expected:
        raise ModelError(
            f"ragged_mask must be a bool tensor of shape {expected}, got {ragged_mask.dtype} "
            f"{tuple(ragged_mask.shape)}; build it with build_ragged_batch / ragged_causal_mask"
        )
    # A row with no visible key would softmax to NaN; the causal rule always lets a token see itself.
    assert bool(ragged_mask.any(dim=1).all()), "every query row must be allowed to see some key"
    return scaled_dot_product_attention(q, k, v, ragged_mask)
