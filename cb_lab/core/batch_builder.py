"""Ragged batches: many requests' tokens in one flat tensor, no padding.

Padding every sequence to the longest wastes compute. A ragged batch lays the chunks
end to end, ``[N_total, D]``, and a boolean mask keeps them apart::

    tokens   a0 a1 a2 b0 b1          mask (True = may attend)   a0 a1 a2 b0 b1
    req_id   a  a  a  b  b                                  a0  x  .  .  .  .
    pos      0  1  2  0  1                                  a1  x  x  .  .  .
                                                            a2  x  x  x  .  .
                                                            b0  .  .  .  x  .
                                                            b1  .  .  .  x  x

The whole rule is one broadcast: *same request and key position <= query position*
(:func:`ragged_causal_mask`). Positions are explicit (``start_pos`` of a chunk plus its
offset), so a chunk in the middle of a prompt gets the right causal alignment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from cb_lab.checks import check_int
from cb_lab.core.view_registry import render
from cb_lab.exceptions import ValidationError

__all__ = [
    "RaggedBatch", "TokenMeta", "build_ragged_batch", "cached_prefix_mask", "ragged_causal_mask", "ragged_positions",
]


@dataclass(frozen=True, slots=True)
class TokenMeta:
    """Where one row of a ragged batch comes from."""

    req_id: str
    pos_in_seq: int  # position of the token inside its request's sequence
    global_idx: int  # row index in the flat batch


class RaggedBatch(NamedTuple):
    """What :func:`build_ragged_batch` returns; unpacks as ``tokens, meta, mask = ...``.

    Printed (or shown in a notebook), it draws the mask: which row may attend to which.
    """

    tokens: torch.Tensor  # [N_total, D]: the chunks end to end
    meta: list[TokenMeta]  # one per row: its request and position
    mask: torch.Tensor  # [N_total, N_total] bool: True where query row i may attend to key row j

    def __repr__(self) -> str:
        return render(self, "text")

    def _repr_html_(self) -> str:
        return render(self)


def ragged_positions(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk index and in-sequence position of every row of chunks laid end to end.

    ``starts``/``lengths`` are ``[B]`` int64; returns ``seq_idx, pos``, each ``[N_total]``.
    """
    total = int(lengths.sum())
    # output_size spares repeat_interleave a slow size computation (milliseconds on CPU).
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths, output_size=total)
    first_row = torch.cumsum(lengths, 0) - lengths  # [B] global index of each chunk's first row
    rows = torch.arange(total, device=lengths.device)
    return seq_idx, rows - first_row[seq_idx] + starts[seq_idx]


def ragged_causal_mask(
    q_seq: torch.Tensor, q_pos: torch.Tensor, k_seq: torch.Tensor, k_pos: torch.Tensor
) -> torch.Tensor:
    """``[Nq, Nk]`` bool: query i may attend key j iff same sequence and ``k_pos[j] <= q_pos[i]``."""
    return (q_seq[:, None] == k_seq[None, :]) & (k_pos[None, :] <= q_pos[:, None])


def cached_prefix_mask(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[N, C + N]`` mask for chunks that sit on top of their requests' cached rows.

    Chunk ``b`` covers positions ``[starts[b], starts[b] + lengths[b])`` and also sees its
    cached rows ``[0, starts[b])``. Key columns: every chunk's cached rows laid end to end
    (``C = sum(starts)``), then the batch's own rows; the last N columns equal the
    ``build_ragged_batch`` mask.
    """
    seq, pos = ragged_positions(starts, lengths)  # [N] each
    cached_seq, cached_pos = ragged_positions(torch.zeros_like(starts), starts)  # [C] each
    return ragged_causal_mask(seq, pos, torch.cat([cached_seq, seq]), torch.cat([cached_pos, pos]))


def _check_chunk(i: int, chunk: object) -> tuple[str, int, torch.Tensor]:
    if not (isinstance(chunk, tuple) and len(chunk) == 3):
        raise ValidationError(f"chunk {i} must be a (req_id, start_pos, tokens) tuple, got {chunk!r}")
    req_id, start, tokens = chunk
    if not isinstance(req_id, str):
        raise ValidationError(f"chunk {i}: req_id must be a str, got {req_id!r}")
    check_int(f"chunk {i} ({req_id!r}): start_pos", start, 0, ValidationError)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] == 0:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValidationError(f"chunk {i} ({req_id!r}): tokens must be a non-empty [len, dim] tensor, got {shape}")
    return req_id, start, tokens


def _check_no_overlap(checked: Sequence[tuple[str, int, torch.Tensor]]) -> None:
    """Two chunks of one request must cover different positions (one row per position)."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for req_id, start, tokens in checked:
        spans.setdefault(req_id, []).append((start, start + tokens.shape[0]))
    for req_id, ranges in spans.items():
        ranges.sort()
        for (s0, e0), (s1, e1) in zip(ranges, ranges[1:]):
            if s1 < e0:
                raise ValidationError(
                    f"chunks [{s0}, {e0}) and [{s1}, {e1}) of request {req_id!r} overlap: a position of a request "
                    "may appear once per batch; give its chunks disjoint positions"
                )


def build_ragged_batch(
    chunks: Sequence[tuple[str, int, torch.Tensor]],
) -> RaggedBatch:
    """Concatenate ``(req_id, start_pos, tokens)`` chunks into one ragged batch.

    Returns ``tokens [N_total, D]``, one :class:`TokenMeta` per row, and the boolean
    mask ``[N_total, N_total]`` (True = may attend). The mask goes by request, not by chunk:
    a request may bring several chunks (at positions that do not overlap), and a row sees
    every row of its request at a position not after its own, whichever chunk holds it.
    No chunks give the empty batch: ``tokens [0, 0]``, no meta, a ``[0, 0]`` mask.
    """
    if len(chunks) == 0:
        return RaggedBatch(torch.empty(0, 0), [], torch.empty(0, 0, dtype=torch.bool))
    checked = [_check_chunk(i, c) for i, c in enumerate(chunks)]
    dims = {tokens.shape[1] for _, _, tokens in checked}
    if len(dims) != 1:
        raise ValidationError(f"all chunks must have the same dim, got dims {sorted(dims)}")
    req_ids = [req_id for req_id, _, _ in checked]
    number = {req_id: i for i, req_id in enumerate(dict.fromkeys(req_ids))}  # request number, first come first
    if len(number) < len(req_ids):
        _check_no_overlap(checked)
    tokens = torch.cat([t for _, _, t in checked])
    starts = torch.tensor([s for _, s, _ in checked], device=tokens.device)
    lengths = torch.tensor([t.shape[0] for _, _, t in checked], device=tokens.device)
    chunk_idx, pos = ragged_positions(starts, lengths)  # [N] each
    seq_idx = torch.tensor([number[r] for r in req_ids], device=tokens.device)[chunk_idx]  # [N]: the row's request
    mask = ragged_causal_mask(seq_idx, pos, seq_idx, pos)
    meta = [
        TokenMeta(req_ids[c], p, i) for i, (c, p) in enumerate(zip(chunk_idx.tolist(), pos.tolist()))
    ]
    return RaggedBatch(tokens, meta, mask)
