"""Dense attention: the one softmax(QK^T / sqrt(D)) V that every path in cb-lab uses.

Shapes: ``q [Nq, D]``, ``k, v [Nk, D]``, ``mask [Nq, Nk]`` bool (True = may attend).
Masked scores become ``-inf`` *before* the softmax, so a masked key gets exactly zero
probability. (Clamping probabilities after the softmax instead leaks mass across
requests.) The probabilities are returned too: attention plugins look at them.

The causal mask is aligned to the lower right: with a cached prefix the queries are
the *last* ``Nq`` positions of ``Nk``. ``F.scaled_dot_product_attention(is_causal=True)``
aligns to the upper left instead, which is wrong for a chunk on top of a cache.
"""

from __future__ import annotations

import torch

__all__ = ["causal_mask", "dense_causal_attention", "scaled_dot_product_attention"]


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out [..., Nq, D], probs [..., Nq, Nk])``; leading batch dims broadcast.

    Every mask row must allow some key (a fully masked row would softmax to NaN).
    """
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # [Nq, Nk]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return probs @ v, probs


def causal_mask(q_len: int, k_len: int, device: torch.device | None = None) -> torch.Tensor:
    """``[q_len, k_len]`` bool, lower-right aligned: query i sees keys ``0 .. k_len - q_len + i``."""
    assert k_len >= q_len, f"causal mask needs k_len >= q_len, got {k_len} < {q_len}"
    ones = torch.ones((q_len, k_len), dtype=torch.bool, device=device)
    return ones.tril(diagonal=k_len - q_len)


def dense_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of one sequence; the queries are the last ``Nq`` of the ``Nk`` positions."""
    return scaled_dot_product_attention(q, k, v, causal_mask(q.shape[0], k.shape[0], q.device))
