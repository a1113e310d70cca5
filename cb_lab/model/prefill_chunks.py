"""Prefill attention chunk by chunk: a step's prefill mask is block-diagonal, so skip the blocks between chunks.

A step's ``P`` prefill rows are chunks of different requests, one after the other. Each chunk sees
its request's cached prefix (its own columns among the ``C`` cached rows, laid end to end in chunk
order) and its own rows causally, never another chunk's (``cached_prefix_mask``)::

    mask [P, C + P]        cached     own rows
    chunk a (start 0)      . . .    | a . . .
    chunk b (start 3)      b b b .  | . b . .      (b sees its 3 cached rows, then itself)

One attention call over the whole mask scores every row against every key and throws most of it
away: with four chunks of 128 rows, three quarters. ``prefill_chunks`` reads the chunks off the mask
once per step (every layer reuses them) and ``chunked_attention`` runs one call per chunk over its
own keys only. The math is the same (a masked key weighs 0 either way); the sums may round
differently in the last bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from cb_lab.model.llama_layers import grouped_attention

__all__ = ["PrefillChunkSpan", "chunked_attention", "prefill_chunks"]


@dataclass(frozen=True, slots=True)
class PrefillChunkSpan:
    """One chunk's rows among the ``P`` prefill rows (the same span of the own-row keys), and its cached prefix
    among the ``C`` cached rows (empty for a chunk that starts at position 0)."""

    rows: slice
    cached: slice


def prefill_chunks(mask: torch.Tensor) -> list[PrefillChunkSpan]:
    """The chunks of a prefill mask ``[P, C + P]`` laid out as ``cached_prefix_mask`` lays them out."""
    P = mask.shape[0]
    C = mask.shape[1] - P
    # Row r + 1 continues row r's chunk iff it sees row r: a chunk's rows see each other causally.
    continues = mask[:, C:].diagonal(-1)  # [P - 1]
    starts = [0, *(torch.nonzero(~continues).flatten() + 1).tolist()]
    ends = [*starts[1:], P]
    cached = mask[starts, :C].sum(-1).tolist()  # cached rows each chunk sees (its start position)
    offsets = [0, *accumulate(cached)]
    spans = [PrefillChunkSpan(slice(s, e), slice(o, o + c)) for s, e, o, c in zip(starts, ends, offsets, cached)]
    seen = sum((e - s) * c + (e - s) * (e - s + 1) // 2 for s, e, c in zip(starts, ends, cached))
    assert offsets[-1] == C and int(mask.sum()) == seen, "a prefill mask sees exactly its cached prefix and itself"
    return spans


def chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cached_k: torch.Tensor | None, cached_v: torch.Tensor | None,
    mask: torch.Tensor, chunks: list[PrefillChunkSpan],
) -> torch.Tensor:
    """``grouped_attention`` of the prefill rows ``q [P, H, d]`` one chunk at a time -> ``[P, H, d]``.

    ``k, v [P, G, d]`` are the rows' own keys and values, ``cached_k, cached_v [C, G, d]`` the cached
    prefixes (None when no chunk has one); ``mask [P, C + P]`` as ``prefill_chunks`` reads it.
    """
    C = mask.shape[1] - mask.shape[0]
    out = []
    for c in chunks:
        keys, values, sub_mask = k[c.rows], v[c.rows], mask[c.rows, C + c.rows.start : C + c.rows.stop]
        if c.cached.stop > c.cached.start:
            assert cached_k is not None and cached_v is not None
            keys, values = torch.cat([cached_k[c.cached], keys]), torch.cat([cached_v[c.cached], values])
            sub_mask = torch.cat([mask[c.rows, c.cached], sub_mask], dim=1)
        out.append(grouped_attention(q[c.rows], keys, values, sub_mask))
    return torch.cat(out)
