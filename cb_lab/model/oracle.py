"""The oracle: what a request's tokens must be, recomputed the slow, obvious way.

Continuous batching is an execution strategy, never a change of results. Whatever the
schedule (budget, chunk size, cache layout, arrival order), a finished request's
generated tokens ``g1..gn`` must equal the rows ``L-1 .. L+n-2`` of ONE dense causal
forward over ``cat(prompt, g1..g(n-1))`` (each row through the sampler, if any), to
float32 rounding. No cache, no mask tricks, no batching: nothing to get wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from cb_lab.core.request import Request
from cb_lab.model.tiny_llm import TinyLLM

__all__ = ["naive_tokens", "oracle_error"]


def naive_tokens(
    model: TinyLLM, req: Request, sampler: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """The tokens ``[n, D]`` that ``req`` must hold, from one dense forward (n = tokens it holds)."""
    n = len(req.generated_tokens)
    seq = torch.cat([req.prompt, *(t[None] for t in req.generated_tokens[: n - 1])])  # [L + n - 1, D]
    rows = model.forward_prefill_dense(seq)[0][req.prompt_len - 1 :]  # [n, D]
    return rows if sampler is None else torch.stack([sampler(row) for row in rows])


def oracle_error(
    model: TinyLLM, requests: Sequence[Request], sampler: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> float:
    """Largest |batched - naive| over every generated value of ``requests`` (0.0 when none)."""
    worst = 0.0
    for req in requests:
        if req.generated_tokens:
            got = torch.stack(req.generated_tokens)
            worst = max(worst, float((got - naive_tokens(model, req, sampler)).abs().max()))
    return worst
