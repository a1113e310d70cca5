"""Which rows of a step's forward get logits, and what each is for.

A real model's LM head costs ``[rows, vocab]``, so the model computes logits only for the rows
that need them (``output_rows``). Most prefill rows only fill the cache; the rows that need
logits are, in this order::

    decode rows          one per decoding request: its next token
    for each prefill chunk:
      prompt rows        positions whose prompt logprobs are asked for (SamplingParams.prompt_logprobs):
                         row p holds log P(prompt[p + 1] | prompt[:p + 1])
      its last row       if the chunk ends its prompt: the request's first token

Without prompt logprobs the rows are exactly the token rows, as before. Shapes: ``N`` output rows,
``T`` token rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cb_lab.core.plan import PrefillChunk
from cb_lab.sampling import LogprobsTensors, compute_logprobs

__all__ = ["OutputRows", "output_rows", "prompt_logprobs"]


@dataclass(frozen=True, slots=True)
class OutputRows:
    """``rows [N]``: input rows whose logits the model computes. ``token_rows [T]``: where the token rows
    are among them (None: all of them are). ``prompt``: per chunk, its prompt rows among them and the
    positions they are for (an empty range when it asks for none)."""

    rows: torch.Tensor
    token_rows: torch.Tensor | None
    prompt: tuple[tuple[slice, range], ...]

    def tokens(self, out: torch.Tensor) -> torch.Tensor:
        """The token rows of the model's output ``[N, vocab]``: ``[T, vocab]``."""
        return out if self.token_rows is None else out[self.token_rows]


def output_rows(chunks: Sequence[PrefillChunk], first: int, device: torch.device) -> OutputRows:
    """The rows of a forward over ``first`` decode rows, then the chunks' rows, that need logits."""
    rows, token_rows = list(range(first)), list(range(first))
    prompt: list[tuple[slice, range]] = []
    offset = first  # the chunk's first row in the forward's input
    for chunk in chunks:
        positions = chunk.request.prompt_logprob_positions(chunk.start, chunk.end)
        begin = len(rows)
        rows += range(offset + positions.start - chunk.start, offset + positions.stop - chunk.start)
        prompt.append((slice(begin, len(rows)), positions))
        if chunk.completes_prompt:
            token_rows.append(len(rows))
            rows.append(offset + chunk.length - 1)
        offset += chunk.length
    every = len(token_rows) == len(rows)
    return OutputRows(torch.tensor(rows, dtype=torch.long, device=device),
                      None if every else torch.tensor(token_rows, dtype=torch.long, device=device), tuple(prompt))


def prompt_logprobs(out: torch.Tensor, rows: OutputRows,
                    chunks: Sequence[PrefillChunk]) -> list[LogprobsTensors | None]:
    """Per chunk, the logprobs of the next prompt token at each of its prompt rows (None if it has none),
    computed for all chunks at once and moved to the CPU once; each has the batch's widest ``k``."""
    asked = [(c, where, positions) for c, (where, positions) in zip(chunks, rows.prompt) if positions]
    if not asked:
        return [None] * len(chunks)
    logits = torch.cat([out[where] for _, where, _ in asked])  # [P, vocab]
    targets = torch.cat([c.request.prompt[p.start + 1 : p.stop + 1] for c, _, p in asked]).to(out.device)  # [P]
    k = max(c.request.sampling.prompt_logprobs or 0 for c, _, _ in asked if c.request.sampling is not None)
    computed = compute_logprobs(logits, targets, k).to("cpu")
    parts, start = {}, 0
    for chunk, _, positions in asked:
        parts[id(chunk)] = computed[start : start + len(positions)]
        start += len(positions)
    return [parts.get(id(c)) for c in chunks]
