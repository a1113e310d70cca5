"""Paged attention: decode queries read their keys and values straight from blocks.

A paged cache stores a request's K/V in fixed-size blocks ``[num_blocks, block_size, D]``
scattered anywhere in a pool; the request's *block table* lists its blocks in order.
Instead of first copying them into one contiguous tensor, attention gathers them by
block table, for a whole batch of requests at once::

    block_tables [B, max_blocks] --gather--> keys [B, max_blocks * block_size, D]
    slot s of row b is valid iff s < context_lens[b]       (the tail of the last block is empty)

A decode token also attends to itself. Its K/V are not in the blocks yet (the step only
writes after compute succeeds), so they come in as ``new_keys / new_values`` and join
as one extra, always-valid column. The math is dense attention's (masked scores are
``-inf`` before the softmax); the layout is the point: the gathered keys are read once
by one batched matmul, never copied again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GatherWorkspace", "PagedKV", "paged_attention"]


class GatherWorkspace:
    """Buffers kept across steps for paged attention's gathers (keys, values).

    A step gathers every cached row its decodes attend to: tens of MB at dim 1024. A fresh
    tensor that large costs page faults each step (the allocator hands it straight back to
    the OS when freed); gathering into a buffer that only ever grows avoids them.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def gather(self, name: str, cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """``cache[block_tables]`` as ``[B, max_blocks * block_size, D]``, written into the buffer ``name``."""
        n = block_tables.numel()
        buf = self.buffers.get(name)
        if (buf is None or buf.shape[0] < n or buf.shape[1:] != cache.shape[1:] or buf.dtype != cache.dtype
                or buf.device != cache.device):
            grown = max(n, 2 * buf.shape[0]) if buf is not None else n
            buf = self.buffers[name] = cache.new_empty((grown, *cache.shape[1:]))
        out = buf[:n]
        torch.index_select(cache, 0, block_tables.reshape(-1), out=out)
        return out.view(block_tables.shape[0], -1, cache.shape[-1])


@dataclass(frozen=True, slots=True)
class PagedKV:
    """Where a batch of B decode rows finds its cached K/V: blocks, one block-table row per query, lengths.

    A contiguous cache fits too: make each request's rows one block
    (``key_cache [B, S, D]``, ``block_tables = arange(B)[:, None]``).
    """

    key_cache: torch.Tensor  # [num_blocks, block_size, D]
    value_cache: torch.Tensor  # [num_blocks, block_size, D]
    block_tables: torch.Tensor  # [B, max_blocks] int64
    context_lens: torch.Tensor  # [B] int64
    workspace: GatherWorkspace | None = None  # reuse gather buffers across steps

    @property
    def num_rows(self) -> int:
        return self.block_tables.shape[0]


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    new_keys: torch.Tensor | None = None,
    new_values: torch.Tensor | None = None,
    workspace: GatherWorkspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query [B, D]`` over each row's cached blocks (plus its own new K/V).

    ``key_cache/value_cache [num_blocks, block_size, D]``; ``block_tables [B, max_blocks]``
    int64 (padding entries may be any valid block id: they are masked out);
    ``context_lens [B]`` cached positions per row. Returns ``(out [B, D], probs [B, S])``
    with ``S = max_blocks * block_size`` (+1 when new K/V are given). ``workspace`` keeps the
    gather buffers between calls (the fused executor passes one).
    """
    B, D = query.shape
    scale = D**-0.5
    if workspace is None:
        keys = key_cache[block_tables].reshape(B, -1, D)  # [B, S, D]: the one gather
        values = value_cache[block_tables].reshape(B, -1, D)
    else:
        keys = workspace.gather("keys", key_cache, block_tables)
        values = workspace.gather("values", value_cache, block_tables)
    keys, values = keys.to(query.dtype), values.to(query.dtype)
    valid = torch.arange(keys.shape[1], device=query.device)[None, :] < context_lens[:, None]  # [B, S]
    scores = torch.bmm(keys, query[:, :, None])[:, :, 0] * scale  # [B, S]
    scores = scores.masked_fill(~valid, float("-inf"))
    if new_keys is not None:
        # The token's own key joins as one more column, without copying the gathered keys.
        scores = torch.cat([scores, (query * new_keys).sum(-1, keepdim=True) * scale], dim=1)  # [B, S+1]
    assert bool(torch.isfinite(scores).any(dim=1).all()), "every decode row needs at least one visible key"
    probs = torch.softmax(scores, dim=-1)
    out = torch.bmm(probs[:, None, : keys.shape[1]], values)[:, 0, :]  # [B, D]
    if new_values is not None:
        out = out + probs[:, -1:] * new_values
    return out, probs
