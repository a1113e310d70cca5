"""Sampling a token id from logits, per request, the same whatever the batch.

``SamplingParams`` (vLLM's and mini-infer's name, with vLLM's fields and defaults) says how one
request picks its tokens: greedy (``temperature=0``), or from the softmax at a temperature, cut
to the ``top_k`` most likely ids and to the smallest set whose probability reaches ``top_p``,
after ``min_tokens`` and the repetition, frequency and presence penalties
(``cb_lab/logits_processors.py``). Its random draws never depend on the schedule: token ``i`` of
a request draws from a generator seeded by ``(seed, i)`` alone, so a request samples the same
tokens alone or in a crowd, after a preemption, and when a step is retried after a fault. It
stops at ``max_tokens``, at its EOS (unless ``ignore_eos``), at any of ``stop_token_ids``, or
(the engine checks its text) at any of the ``stop`` strings. ``n > 1`` asks for that many samples
of one prompt: the prompt is prefilled once and each further sample is a fork
(``Request.fork``) with its own random stream (``sample_params(i)``).

``logprobs=k`` returns, for each generated token, its log-probability and the ``k`` best; and
``prompt_logprobs=k`` the same for each prompt token. They are vLLM's default "raw" logprobs:
``log_softmax`` of the model's logits, before penalties, temperature or cuts
(``compute_logprobs``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from cb_lab.checks import check_int, check_optional_int
from cb_lab.core.view_registry import render
from cb_lab.exceptions import ConfigurationError
from cb_lab.logits_processors import TokenHistory, apply_min_tokens, apply_penalties, has_penalties

__all__ = ["GREEDY_BELOW", "LogprobsTensors", "SamplingParams", "compute_logprobs", "sample_batch"]


def _check_number(name: str, value: object, low: float, high: float, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigurationError(f"SamplingParams {name} must be {fix}, got {value!r}")


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
    logprobs: int | None = None  # per generated token: its logprob and the k best ids' (0: its own only)
    prompt_logprobs: int | None = None  # the same for each prompt token after the first
    stop: str | Sequence[str] | None = None  # stop strings (held as a tuple): the text is cut before one
    include_stop_str_in_output: bool = False  # ... or after it
    min_tokens: int = 0  # EOS and stop ids are suppressed until the request has this many tokens
    repetition_penalty: float = 1.0  # > 1: ids seen in the prompt or output are less likely
    frequency_penalty: float = 0.0  # in [-2, 2]: minus this per occurrence in the output
    presence_penalty: float = 0.0  # in [-2, 2]: minus this once an id occurs in the output

    def __post_init__(self) -> None:
        check_int("SamplingParams max_tokens", self.max_tokens, 0)
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < math.inf):
            raise ConfigurationError(f"SamplingParams temperature must be a number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigurationError(f"SamplingParams top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigurationError(f"SamplingParams top_p must be in (0, 1], got {self.top_p!r}")
        check_int("SamplingParams n", self.n, 1)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigurationError(f"SamplingParams seed must be an int or None, got {self.seed!r}")
        stop = self.stop_token_ids
        if isinstance(stop, (str, bytes)) or not isinstance(stop, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in stop):
            raise ConfigurationError(f"SamplingParams stop_token_ids must be a list of int ids >= 0, got {stop!r:.60}")
        object.__setattr__(self, "stop_token_ids", tuple(stop))
        check_optional_int("SamplingParams logprobs", self.logprobs, 0)
        check_optional_int("SamplingParams prompt_logprobs", self.prompt_logprobs, 0)
        self._check_stop()
        check_int("SamplingParams min_tokens", self.min_tokens, 0)
        if self.min_tokens > self.max_tokens:
            raise ConfigurationError(f"SamplingParams min_tokens={self.min_tokens} must be at most max_tokens="
                                     f"{self.max_tokens}; lower min_tokens or raise max_tokens")
        _check_number("repetition_penalty", self.repetition_penalty, 1e-9, math.inf, "a number > 0 (1: off)")
        _check_number("frequency_penalty", self.frequency_penalty, -2, 2, "in [-2, 2] (0: off)")
        _check_number("presence_penalty", self.presence_penalty, -2, 2, "in [-2, 2] (0: off)")

    def _check_stop(self) -> None:
        """``stop``: None, or one string or a list of them, held as a tuple; "" would stop at once."""
        if not isinstance(self.include_stop_str_in_output, bool):
            raise ConfigurationError(f"SamplingParams include_stop_str_in_output must be a bool, got "
                                     f"{self.include_stop_str_in_output!r}")
        stop = self.stop
        if stop is None:
            return
        strings = (stop,) if isinstance(stop, str) else stop
        if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) and s for s in strings):
            raise ConfigurationError(f"SamplingParams stop must be a string or a list of non-empty strings, got "
                                     f"{stop!r:.60}")
        object.__setattr__(self, "stop", tuple(strings))

    def _repr_html_(self) -> str:
        return render(self)

    def sample_params(self, index: int) -> SamplingParams:
        """The params of sample ``index`` of ``n``: one sample each, and a seed of its own (``seed + index``).
        The prompt's logprobs are the first sample's: the others do not compute them again."""
        return replace(self, n=1, seed=None if self.seed is None else self.seed + index,
                       prompt_logprobs=self.prompt_logprobs if index == 0 else None)

    def generator(self, req_id: str, index: int) -> torch.Generator:
        """The generator of token ``index``: seeded by ``(seed, index)`` only, never by the batch."""
        seed = self.seed if self.seed is not None else zlib.crc32(req_id.encode())
        return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{index}".encode()))

    def stops(self, token: int, eos_token_id: int | None) -> bool:
        """True when ``token`` ends the request (its EOS, unless ``ignore_eos``, or a stop id)."""
        return token in self.stop_token_ids or (not self.ignore_eos and eos_token_id is not None
                                                and token == eos_token_id)

    def sample(self, logits: torch.Tensor, req_id: str, index: int) -> torch.Tensor:
        """Token ``index`` of request ``req_id`` from ``logits [vocab]``: a 0-d int64 tensor (no penalties:
        they need the request's tokens, which ``sample_batch`` takes)."""
        return sample_batch(logits[None], [self], [req_id], [index])[0]


# A temperature this small is greedy (vLLM's sampling epsilon): dividing by it would overflow to inf.
GREEDY_BELOW = 1e-5


@torch.no_grad()
def sample_batch(logits: torch.Tensor, params: Sequence[SamplingParams], req_ids: Sequence[str],
                 indices: Sequence[int], *, history: Sequence[TokenHistory | None] | None = None,
                 eos_token_ids: Sequence[int | None] | None = None) -> torch.Tensor:
    """One token per row of ``logits [R, vocab]``, row ``r`` by ``params[r]``: ``[R]`` int64.

    First the rows that ask for it are changed: ``min_tokens`` (``indices[r]`` tokens so far;
    ``eos_token_ids[r]`` is the row's EOS) and the penalties (``history[r]``: the row's prompt and
    output ids, needed only for rows with penalties). Then the whole batch is cut in tensor ops
    (temperature, top-k, top-p); only the draw is per row: one uniform number from row ``r``'s
    own generator (``generator(req_ids[r], indices[r])``), turned into a token through the row's
    cumulative probabilities (inverse-CDF sampling), so a request's tokens never depend on its
    neighbours.
    """
    logits = _processed(logits, params, indices, history, eos_token_ids)
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


def _processed(logits: torch.Tensor, params: Sequence[SamplingParams], indices: Sequence[int],
               history: Sequence[TokenHistory | None] | None,
               eos_token_ids: Sequence[int | None] | None) -> torch.Tensor:
    """``logits`` after ``min_tokens`` and the penalties: a float32 copy if any row asks, else ``logits``."""
    min_tokens = any(i < p.min_tokens for p, i in zip(params, indices))
    penalties = any(has_penalties(p) for p in params)
    if not (min_tokens or penalties):
        return logits
    scores = logits.to(torch.float32, copy=True)  # [R, V]: the model's output stays as it was
    if min_tokens:
        apply_min_tokens(scores, params, indices, eos_token_ids or [None] * len(params))
    if penalties:
        apply_penalties(scores, params, history or [None] * len(params))
    return scores


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
    # >= 1: the best id is never beyond (clamped: a top_p that rounds to 0 in float32 keeps the best id only)
    kept = (~beyond).sum(-1, keepdim=True).clamp(min=1)
    threshold = best.gather(1, kept - 1)  # [S, 1]: the last value kept
    threshold = threshold.masked_fill(~torch.tensor(has_cut, device=scores.device)[:, None], float("-inf"))
    return scores.masked_fill(scores < threshold, float("-inf"))


@dataclass(frozen=True, slots=True)
class LogprobsTensors:
    """Logprobs of some rows (vLLM's name): column 0 is the row's token itself, then its ``k`` best ids."""

    logprob_token_ids: torch.Tensor  # [R, 1 + k] int64
    logprobs: torch.Tensor  # [R, 1 + k] float32
    ranks: torch.Tensor  # [R] int64: the token's rank in its row (1: the most likely)

    def __getitem__(self, rows: slice) -> LogprobsTensors:
        """Rows ``rows`` (views)."""
        return LogprobsTensors(self.logprob_token_ids[rows], self.logprobs[rows], self.ranks[rows])

    def __len__(self) -> int:
        return self.ranks.shape[0]

    def to(self, device: torch.device | str) -> LogprobsTensors:
        return LogprobsTensors(self.logprob_token_ids.to(device), self.logprobs.to(device), self.ranks.to(device))


@torch.no_grad()
def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int) -> LogprobsTensors:
    """``log_softmax`` of the raw ``logits [R, V]`` at ``token_ids [R]``, with each token's rank and the
    ``num_logprobs`` best ids of each row (vLLM's raw logprobs: before penalties, temperature, cuts)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
    chosen = logprobs.gather(1, token_ids[:, None])  # [R, 1]
    ranks = (logprobs >= chosen).sum(-1)  # [R]: ids at least as likely, itself included
    best = torch.topk(logprobs, num_logprobs, dim=-1)  # [R, k]
    return LogprobsTensors(torch.cat([token_ids[:, None], best.indices], 1), torch.cat([chosen, best.values], 1),
                           ranks)
