"""Paged attention: decode queries read their keys and values straight from blocks.

A paged cache stores a request's K/V in fixed-size blocks ``[num_blocks, block_size, D]``
scattered anywhere in a pool; the request's *block table* lists its blocks in order.
Attention gathers the blocks a batch of requests holds, all in one flat list, and never
pads one request to another's length::

    block_tables [B, max_blocks]  ->  the n blocks in use, owner[n] = which query row
    keys   = key_cache[blocks]                      [n, block_size, D]   (the one gather)
    scores = keys @ query[owner]                    [n, block_size]      (one batched matmul)
    scores laid out per row, slot s of row b valid iff s < context_lens[b]   ->  softmax
    out[b] = sum over b's blocks of  probs @ values                      (one matmul, index_add)

A decode token also attends to itself. Its K/V are not in the blocks yet (the step only
writes after compute succeeds), so they come in as ``new_keys / new_values`` and join
as one extra, always-valid column. The math is dense attention's (masked scores are
``-inf`` before the softmax); the layout is the point: every cached row is gathered once
and read once, padding rows never (block tables of 64..512 positions padded to the
longest would gather 1.8x the rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BUCKET_OVERHEAD_BLOCKS", "DecodeBucket", "GatherWorkspace", "PagedKV", "decode_buckets", "paged_attention",
           "paged_attention_heads"]


class GatherWorkspace:
    """Buffers kept across steps for paged attention's gathers (keys, values).

    A step gathers every cached row its decodes attend to: tens of MB at dim 1024. A fresh
    tensor that large costs page faults each step (the allocator hands it straight back to
    the OS when freed); gathering into a buffer that only ever grows avoids them.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def gather(self, name: str, cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """``cache[block_ids]`` (``[n, block_size, D]``), written into the buffer ``name``."""
        n = block_ids.shape[0]
        buf = self.buffers.get(name)
        if (buf is None or buf.shape[0] < n or buf.shape[1:] != cache.shape[1:] or buf.dtype != cache.dtype
                or buf.device != cache.device):
            grown = max(n, 2 * buf.shape[0]) if buf is not None else n
            buf = self.buffers[name] = cache.new_empty((grown, *cache.shape[1:]))
        out = buf[:n]
        torch.index_select(cache, 0, block_ids, out=out)
        return out


@dataclass(frozen=True, slots=True)
class PagedKV:
    """Where a batch of B decode rows finds its cached K/V: blocks, one block-table row per query, lengths.

    The caches are a ``BlockPool``'s, layer-major: ``key_cache[layer]`` is one layer's blocks. A
    contiguous cache fits too: make each request's rows one block of one layer
    (``key_cache [1, B, S, D]``, ``block_tables = arange(B)[:, None]``).
    """

    key_cache: torch.Tensor  # [num_layers, num_blocks, block_size, layer_dim]
    value_cache: torch.Tensor  # [num_layers, num_blocks, block_size, layer_dim]
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
    max_blocks, block_size = block_tables.shape[1], key_cache.shape[1]
    S, scale = max_blocks * block_size, D**-0.5
    # Which table entries hold cached rows: [B, max_blocks]; the rest is padding.
    num_blocks = (context_lens + block_size - 1) // block_size  # [B]
    in_use = torch.arange(max_blocks, device=query.device)[None, :] < num_blocks[:, None]
    if bool(in_use.all()):  # no padding (one request, or equal block counts): the table is the list
        block_ids, owner = block_tables.reshape(-1), None
    else:  # gather only the n blocks in use; owner[i]: the query row of block i
        block_ids, owner = block_tables[in_use], torch.arange(B, device=query.device).repeat_interleave(num_blocks)
    n = block_ids.shape[0]
    if n == key_cache.shape[0] and torch.equal(block_ids, torch.arange(n, device=query.device)):
        keys, values = key_cache, value_cache  # every block in order (padded contiguous caches): read in place
    else:  # [n, block_size, D] each
        keys = _gather(workspace, "keys", key_cache, block_ids)
        values = _gather(workspace, "values", value_cache, block_ids)
    keys, values = keys.to(query.dtype), values.to(query.dtype)
    if owner is not None:
        block_scores = torch.bmm(keys, query[owner][:, :, None])[:, :, 0] * scale  # [n, block_size]
        # Laid out per row, [B, S]: small (no D axis); the padding blocks score -inf.
        scores = block_scores.new_full((B * max_blocks, block_size), float("-inf"))
        scores[in_use.reshape(-1)] = block_scores
        scores = scores.reshape(B, S)
    else:
        scores = torch.bmm(keys.reshape(B, S, D), query[:, :, None])[:, :, 0] * scale  # [B, S]
    valid = torch.arange(S, device=query.device)[None, :] < context_lens[:, None]  # [B, S]
    scores = scores.masked_fill(~valid, float("-inf"))
    if new_keys is not None:
        # The token's own key joins as one more column.
        scores = torch.cat([scores, (query * new_keys).sum(-1, keepdim=True) * scale], dim=1)  # [B, S+1]
    assert bool(torch.isfinite(scores).any(dim=1).all()), "every decode row needs at least one visible key"
    probs = torch.softmax(scores, dim=-1)
    if owner is not None:
        block_probs = probs[:, :S].reshape(B * max_blocks, block_size)[in_use.reshape(-1)]  # [n, block_size]
        per_block = torch.bmm(block_probs[:, None, :], values)[:, 0, :]  # [n, D]
        out = per_block.new_zeros((B, D)).index_add_(0, owner, per_block)  # [B, D]: sum over a row's blocks
    else:
        out = torch.bmm(probs[:, None, :S], values.reshape(B, S, D))[:, 0, :]  # [B, D]
    if new_values is not None:
        out = out + probs[:, -1:] * new_values
    return out, probs


def _gather(workspace: GatherWorkspace | None, name: str, cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """``cache[block_ids]`` ``[n, block_size, D]``, into the workspace's buffer when there is one."""
    return cache[block_ids] if workspace is None else workspace.gather(name, cache, block_ids)


# A bucket is worth its own gather and attention call when it saves this many padding blocks per row set:
# below it, the extra calls (a few per layer) cost more than attending over the padding.
BUCKET_OVERHEAD_BLOCKS = 32


@dataclass(frozen=True, slots=True)
class DecodeBucket:
    """Decode rows of similar length, attended together: their tables padded to one ``width``.

    ``width`` blocks hold each row's cached positions *and* one more slot at position
    ``context_lens[r]``, where the step's own new K/V is written into the gathered copy.
    """

    rows: torch.Tensor  # [b] which query rows (indices into the step's decode rows)
    tables: torch.Tensor  # [b, width] block ids; padding entries are block 0 (masked out)
    lens: torch.Tensor  # [b] cached positions per row
    valid: torch.Tensor  # [b, 1, 1, width * block_size]: slot s is attended iff s <= lens[r]


def decode_buckets(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> list[DecodeBucket]:
    """Group decode rows by length so attention runs over (almost) no padding.

    Rows sorted by the blocks they need (``ceil((len + 1) / block_size)``: the cache and the new
    token) join the current bucket until the padding that would add (every row in it grows to
    the newcomer's width) exceeds ``BUCKET_OVERHEAD_BLOCKS``. Computed once per step; every
    layer reuses it. ``block_tables [B, max_blocks]``, ``context_lens [B]``.
    """
    widths = (context_lens // block_size + 1).tolist()  # blocks for len + 1 positions
    order = sorted(range(len(widths)), key=widths.__getitem__)
    groups: list[list[int]] = []
    for r in order:
        if groups and len(groups[-1]) * (widths[r] - widths[groups[-1][-1]]) <= BUCKET_OVERHEAD_BLOCKS:
            groups[-1].append(r)
        else:
            groups.append([r])
    device = block_tables.device
    buckets = []
    for group in groups:
        rows = torch.tensor(group, device=device)
        width = widths[group[-1]]
        tables = block_tables[rows]
        if tables.shape[1] < width:  # the new token's slot starts a block no table holds yet
            tables = torch.nn.functional.pad(tables, (0, width - tables.shape[1]))
        tables = tables[:, :width]
        lens = context_lens[rows]
        slots = torch.arange(width * block_size, device=device)
        buckets.append(DecodeBucket(rows, tables, lens, (slots[None, :] <= lens[:, None])[:, None, None, :]))
    return buckets


def paged_attention_heads(
    query: torch.Tensor,
    key_blocks: torch.Tensor,
    value_blocks: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    *,
    buckets: list[DecodeBucket] | None = None,
    workspace: GatherWorkspace | None = None,
) -> torch.Tensor:
    """Decode attention with heads: ``query [B, H, d]`` over each row's blocks and its own new K/V.

    ``key_blocks/value_blocks [num_blocks, block_size, G, d]`` (one layer), ``block_tables
    [B, max_blocks]``, ``context_lens [B]``, ``new_keys/new_values [B, G, d]``. Rows are grouped
    by length (``decode_buckets``; pass ``buckets`` to compute them once per step). For each
    bucket the blocks are gathered once into one buffer ``[b, S, G, d]``, the step's new K/V
    written into it at each row's position (the pool itself is written only at commit), and
    torch's ``scaled_dot_product_attention`` reads that one buffer. Query head ``h`` reads key/value
    head ``h // (H / G)``: the ``H / G`` query heads of a group go in as that head's query rows
    (``[b, G, H / G, d]``), so each key and value is read once per group, not once per query head
    (``enable_gqa`` would read it ``H / G`` times). Returns ``[B, H, d]``.
    """
    block_size = key_blocks.shape[1]
    H, (G, d) = query.shape[1], key_blocks.shape[2:]
    if buckets is None:
        buckets = decode_buckets(block_tables, context_lens, block_size)
    out = query.new_empty(query.shape)
    for i, b in enumerate(buckets):
        n, S = b.rows.shape[0], b.tables.shape[1] * block_size
        ids = b.tables.reshape(-1)
        keys = _gather(workspace, f"keys{i}", key_blocks, ids).view(n, S, *key_blocks.shape[2:])  # [b, S, G, d]
        values = _gather(workspace, f"values{i}", value_blocks, ids).view(n, S, *value_blocks.shape[2:])
        at = torch.arange(n, device=query.device)
        keys[at, b.lens] = new_keys[b.rows].to(keys.dtype)  # the token's own K/V, in the slot after its cache
        values[at, b.lens] = new_values[b.rows].to(values.dtype)
        attn = torch.nn.functional.scaled_dot_product_attention(
            query[b.rows].view(n, G, H // G, d), keys.transpose(1, 2).to(query.dtype),
            values.transpose(1, 2).to(query.dtype), attn_mask=b.valid,
        )  # [b, G, H / G, d]
        out[b.rows] = attn.reshape(n, H, d)
    return out
