"""Sampling a token id from logits, per request, the same whatever the batch.

``SamplingParams`` (vLLM's and mini-infer's name) says how one request picks its tokens: greedy
(``temperature=0``), or from the softmax at a temperature, cut to the ``top_k`` most likely ids
and to the smallest set whose probability reaches ``top_p``. Its random draws never depend on
the schedule: token ``i`` of a request draws from a generator seeded by ``(seed, i)`` alone,
so a request samples the same tokens alone or in a crowd, after a preemption, and when a step
is retried after a fault. It stops at ``max_tokens``, at its EOS (unless ``ignore_eos``) or at
any of ``stop_token_ids``. ``n > 1`` asks for that many samples of one prompt: the prompt is
prefilled once and each further sample is a fork (``Request.fork``) with its own random stream
(``sample_params(i)``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from cb_lab.exceptions import ConfigurationError

__all__ = ["GREEDY_BELOW", "SamplingParams", "sample_batch"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request samples. ``seed=None`` seeds from the request id (still reproducible)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: no cut
    top_p: float = 1.0  # 1.0: no cut
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1  # parallel samples of the prompt: n - 1 forks share its K/V after the prefill

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ConfigurationError(f"SamplingParams max_tokens must be an int >= 0, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < math.inf):
            raise ConfigurationError(f"SamplingParams temperature must be a number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigurationError(f"SamplingParams top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigurationError(f"SamplingParams top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ConfigurationError(f"SamplingParams n must be an int >= 1, got {self.n!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigurationError(f"SamplingParams seed must be an int or None, got {self.seed!r}")
        stop = self.stop_token_ids
        if isinstance(stop, (str, bytes)) or not isinstance(stop, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in stop):
            raise ConfigurationError(f"SamplingParams stop_token_ids must be a list of int ids >= 0, got {stop!r:.60}")
        object.__setattr__(self, "stop_token_ids", tuple(stop))

    def _repr_html_(self) -> str:
        from cb_lab.display.views import config_html  # the views import the core: imported on use

        return config_html(self)

    def sample_params(self, index: int) -> SamplingParams:
        """The params of sample ``index`` of ``n``: one sample each, and a seed of its own (``seed + index``)."""
        return replace(self, n=1, seed=None if self.seed is None else self.seed + index)

    def generator(self, req_id: str, index: int) -> torch.Generator:
        """The generator of token ``index``: seeded by ``(seed, index)`` only, never by the batch."""
        seed = self.seed if self.seed is not None else zlib.crc32(req_id.encode())
        return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{index}".encode()))

    def stops(self, token: int, eos_token_id: int | None) -> bool:
        """True when ``token`` ends the request (its EOS, unless ``ignore_eos``, or a stop id)."""
        return token in self.stop_token_ids or (not self.ignore_eos and eos_token_id is not None
                                                and token == eos_token_id)

    def sample(self, logits: torch.Tensor, req_id: str, index: int) -> torch.Tensor:
        """Token ``index`` of request ``req_id`` from ``logits [vocab]``: a 0-d int64 tensor."""
        return sample_batch(logits[None], [self], [req_id], [index])[0]


# A temperature this small is greedy (vLLM's sampling epsilon): dividing by it would overflow to inf.
GREEDY_BELOW = 1e-5


@torch.no_grad()
def sample_batch(logits: torch.Tensor, params: Sequence[SamplingParams], req_ids: Sequence[str],
                 indices: Sequence[int]) -> torch.Tensor:
    """One token per row of ``logits [R, vocab]``, row ``r`` by ``params[r]``: ``[R]`` int64.

    The whole batch is cut in tensor ops (temperature, top-k, top-p); only the draw is per row:
    one uniform number from row ``r``'s own generator (``generator(req_ids[r], indices[r])``),
    turned into a token through the row's cumulative probabilities (inverse-CDF sampling), so
    a request's tokens never depend on its neighbours.
    """
    tokens = logits.argmax(-1)  # [R]: the greedy rows' answer (and a placeholder for the others)
    sampled = [r for r, p in enumerate(params) if p.temperature >= GREEDY_BELOW]
    if not sampled:
        return tokens
    rows = torch.tensor(sampled, device=logits.device)
    chosen = [params[r] for r in sampled]
    temperature = torch.tensor([p.temperature for p in chosen], device=logits.device)
    scores = logits[rows].float() / temperature[:, None]  # [S, V]
    scores = _cut(scores, [p.top_k for p in chosen], [p.top_p for p in chosen])
    cdf = torch.softmax(scores, dim=-1).cumsum(-1)  # [S, V]
    draws = torch.cat([torch.rand(1, generator=params[r].generator(req_ids[r], indices[r])) for r in sampled])
    # The first id whose cumulative probability passes the draw (clamped: the last cdf value may round below 1).
    picked = torch.searchsorted(cdf, draws.to(cdf.device)[:, None] * cdf[:, -1:]).clamp(max=cdf.shape[1] - 1)
    tokens[rows] = picked[:, 0]
    return tokens


def _cut(scores: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Each row of ``scores [S, V]`` cut to its ``top_k`` best ids (0: all), then to the smallest set of
    those whose probability reaches its ``top_p``. Only a threshold value per row comes out of the
    sorted candidates (``topk`` of the widest cut, not a sort of the whole vocabulary unless a row
    asks for top-p alone), so what a row keeps depends on its own scores and params only."""
    vocab = scores.shape[1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    has_cut = [k < vocab or p < 1 for k, p in zip(ks, top_p)]
    if not any(has_cut):
        return scores
    width = max(k for k, cut in zip(ks, has_cut) if cut)
    best = torch.topk(scores, width, dim=-1).values  # [S, width], best first
    k = torch.tensor(ks, device=scores.device).clamp(max=width)[:, None]
    p = torch.tensor([q if q < 1 else math.inf for q in top_p], device=scores.device)[:, None]
    position = torch.arange(width, device=scores.device)[None, :]
    best = best.masked_fill(position >= k, float("-inf"))  # the row's own top-k
    probs = torch.softmax(best, dim=-1)
    beyond = (probs.cumsum(-1) - probs >= p) | (position >= k)  # after the nucleus is complete, or past k
    kept = (~beyond).sum(-1, keepdim=True)  # >= 1: the best id is never beyond
    threshold = best.gather(1, kept - 1)  # [S, 1]: the last value kept
    threshold = threshold.masked_fill(~torch.tensor(has_cut, device=scores.device)[:, None], float("-inf"))
    return scores.masked_fill(scores < threshold, float("-inf"))
