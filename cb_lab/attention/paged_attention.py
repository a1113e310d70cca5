"""Paged attention: decode queries read their keys and values straight from blocks.

A paged cache stores a request's K/V in fixed-size blocks ``[num_blocks, block_size, D]``
scattered anywhere in a pool; the request's *block table* lists its blocks in order.
Instead of first copying them into one contiguous tensor, attention gathers them by
block table, for a whole batch of requests at once::

    block_tables [B, max_blocks] --gather--> keys [B, max_blocks * block_size, D]
    slot s of row b is valid iff s < context_lens[b]       (the tail of the last block is empty)

A decode token also attends to itself. Its K/V are not in the blocks yet (the step only
writes after compute succeeds), so they come in as ``new_keys / new_values`` and join
as one extra, always-valid column.
"""

from __future__ import annotations

import torch

from cb_lab.attention.dense_attention import scaled_dot_product_attention

__all__ = ["paged_attention"]


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    new_keys: torch.Tensor | None = None,
    new_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query [B, D]`` over each row's cached blocks (plus its own new K/V).

    ``key_cache/value_cache [num_blocks, block_size, D]``; ``block_tables [B, max_blocks]``
    int64 (padding entries may be any valid block id: they are masked out);
    ``context_lens [B]`` cached positions per row. Returns ``(out [B, D], probs [B, S])``
    with ``S = max_blocks * block_size`` (+1 when new K/V are given).
    """
    B, D = query.shape
    keys = key_cache[block_tables].reshape(B, -1, D).to(query.dtype)  # [B, S, D]
    values = value_cache[block_tables].reshape(B, -1, D).to(query.dtype)
    valid = torch.arange(keys.shape[1], device=query.device)[None, :] < context_lens[:, None]  # [B, S]
    if new_keys is not None and new_values is not None:
        keys = torch.cat([keys, new_keys[:, None, :]], dim=1)
        values = torch.cat([values, new_values[:, None, :]], dim=1)
        valid = torch.cat([valid, valid.new_ones((B, 1))], dim=1)
    assert bool(valid.any(dim=1).all()), "every decode row needs at least one visible key"
    # One query per row: [B, 1, D] against [B, S, D], the same kernel as dense attention.
    out, probs = scaled_dot_product_attention(query[:, None, :], keys, values, valid[:, None, :])
    return out[:, 0, :], probs[:, 0, :]
