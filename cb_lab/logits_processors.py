"""What changes a row's logits before a token is picked: ``min_tokens`` and the three penalties.

vLLM's semantics, applied in its order (before temperature, top-k and top-p; greedy rows take
the argmax of what comes out)::

    min_tokens          the row's EOS and stop ids are -inf until it has min_tokens tokens
    repetition_penalty  each id seen in the prompt or the output: a positive logit is divided
                        by it, a negative one multiplied (> 1 discourages repeats)
    frequency_penalty   minus penalty x (times the id occurs in the output)
    presence_penalty    minus penalty x (1 if the id occurs in the output)

Both functions touch only the rows that ask (the others cost nothing) and write into ``scores``,
which the caller owns. A row's result depends on its own logits, params and tokens alone.
Shapes: ``R`` rows, ``V`` the vocabulary, ``P`` the rows with penalties.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch.nn.utils.rnn import pad_sequence

if TYPE_CHECKING:  # sampling.py calls these functions: its params are only named here
    from cb_lab.sampling import SamplingParams

__all__ = ["TokenHistory", "apply_min_tokens", "apply_penalties", "has_penalties"]

TokenHistory = tuple[torch.Tensor, torch.Tensor]  # (prompt ids [L], output ids [n]) of one row


def has_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


def apply_min_tokens(scores: torch.Tensor, params: Sequence[SamplingParams], indices: Sequence[int],
                     eos_token_ids: Sequence[int | None]) -> None:
    """Rows with fewer than ``min_tokens`` tokens (``indices[r]``) cannot draw their EOS or stop ids."""
    rows: list[int] = []
    ids: list[int] = []
    vocab = scores.shape[1]
    for r, (p, index, eos) in enumerate(zip(params, indices, eos_token_ids)):
        if index < p.min_tokens:
            stop = [*p.stop_token_ids, *([eos] if eos is not None and not p.ignore_eos else [])]
            stop = [i for i in stop if i < vocab]
            rows += [r] * len(stop)
            ids += stop
    if rows:  # one indexed write for the whole batch
        scores[torch.tensor(rows, device=scores.device), torch.tensor(ids, device=scores.device)] = float("-inf")


def _counts(tokens: list[torch.Tensor], vocab: int) -> torch.Tensor:
    """``[P, V]``: how often each id occurs in each row's ``tokens`` (padded with the id ``V``, then cut)."""
    padded = pad_sequence(tokens, batch_first=True, padding_value=vocab)  # [P, longest]
    counts = torch.zeros(len(tokens), vocab + 1, dtype=torch.float32, device=padded.device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab]


def apply_penalties(scores: torch.Tensor, params: Sequence[SamplingParams],
                    history: Sequence[TokenHistory | None]) -> None:
    """vLLM's penalties on the rows that have any (``history[r]``: that row's prompt and output ids)."""
    rows = [r for r, p in enumerate(params) if has_penalties(p)]
    if not rows:
        return
    device, vocab = scores.device, scores.shape[1]
    pasts = [history[r] for r in rows]
    assert all(h is not None for h in pasts), "a row with penalties comes with its tokens"
    prompts = [h[0].to(device) for h in pasts if h is not None]
    outputs = [h[1].to(device) for h in pasts if h is not None]
    out_counts = _counts(outputs, vocab)  # [P, V]
    seen = (_counts(prompts, vocab) > 0) | (out_counts > 0)  # repetition: over the prompt and the output
    index = torch.tensor(rows, device=device)
    chosen = [params[r] for r in rows]
    repetition = torch.tensor([p.repetition_penalty for p in chosen], device=device)[:, None]
    frequency = torch.tensor([p.frequency_penalty for p in chosen], device=device)[:, None]
    presence = torch.tensor([p.presence_penalty for p in chosen], device=device)[:, None]
    x = scores[index]  # [P, V]
    x = torch.where(seen, torch.where(x > 0, x / repetition, x * repetition), x)
    scores[index] = x - frequency * out_counts - presence * (out_counts > 0).float()
