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

__all__ = ["GREEDY_BELOW", "NUCLEUS_WINDOW", "LogprobsTensors", "SamplingParams", "compute_logprobs", "sample_batch"]


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


# Candidates a top-p row without top-k looks at first: a trained model's nucleus is usually far
# smaller; a row whose nucleus is wider is cut again over the whole vocabulary, sorted.
NUCLEUS_WINDOW = 256


@torch.no_grad()
def sample_batch(logits: torch.Tensor, params: Sequence[SamplingParams], req_ids: Sequence[str],
                 indices: Sequence[int], *, history: Sequence[TokenHistory | None] | None = None,
                 eos_token_ids: Sequence[int | None] | None = None) -> torch.Tensor:
    """One token per row of ``logits [R, vocab]``, row ``r`` by ``params[r]``: ``[R]`` int64.

    First the rows that ask for it are changed: ``min_tokens`` (``indices[r]`` tokens so far;
    ``eos_token_ids[r]`` is the row's EOS) and the penalties (``history[r]``: the row's prompt and
    output ids, needed only for rows with penalties). Greedy rows take their ``argmax``. The other
    rows are cut in tensor ops (temperature, top-k, top-p); only the draw is per row: one uniform
    number from row ``r``'s own generator (``generator(req_ids[r], indices[r])``), turned into a
    token through the row's cumulative probabilities in id order (inverse-CDF sampling), so a
    request's tokens never depend on its neighbours.
    """
    logits = _processed(logits, params, indices, history, eos_token_ids)
    vocab = logits.shape[1]
    tokens = torch.empty(len(params), dtype=torch.int64, device=logits.device)
    greedy = [r for r, p in enumerate(params) if p.temperature < GREEDY_BELOW]
    whole = [r for r, p in enumerate(params) if p.temperature >= GREEDY_BELOW and not _cuts(p, vocab)]
    cut = [r for r, p in enumerate(params) if p.temperature >= GREEDY_BELOW and _cuts(p, vocab)]
    if greedy:
        tokens[greedy] = _rows(logits, greedy).argmax(-1)
    for rows, draw in ((whole, _draw_whole), (cut, _draw_cut)):
        if rows:
            uniforms = torch.cat([torch.rand(1, generator=params[r].generator(req_ids[r], indices[r])) for r in rows])
            tokens[rows] = draw(_rows(logits, rows), [params[r] for r in rows], uniforms.to(logits.device))
    return tokens


def _cuts(p: SamplingParams, vocab: int) -> bool:
    return 0 < p.top_k < vocab or p.top_p < 1


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return x if len(rows) == len(x) else x[rows]  # all rows: no copy of [R, vocab]


def _temperature(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    return torch.tensor([p.temperature for p in params], device=logits.device)[:, None]  # [S, 1]


def _draw_whole(logits: torch.Tensor, params: Sequence[SamplingParams], uniforms: torch.Tensor) -> torch.Tensor:
    """Rows without a cut: the softmax of ``logits [S, V]`` at each row's temperature."""
    return _inverse_cdf(logits.float() / _temperature(logits, params), uniforms)


def _draw_cut(logits: torch.Tensor, params: Sequence[SamplingParams], uniforms: torch.Tensor,
              width: int | None = None) -> torch.Tensor:
    """Rows cut to their ``top_k``, then to their ``top_p`` nucleus, at their temperature.

    Only the ``width`` best ids are looked at: one more than the widest top-k, or ``NUCLEUS_WINDOW``
    for a row with top-p alone (a ``topk``, not a sort of the vocabulary). A row keeps every id at
    least as good as its last kept one, so when its window's last id is kept (a nucleus wider than
    the window, or ties beyond it) the row is cut again over the whole vocabulary, sorted: the same
    ids either way, so the same token, whatever its neighbours ask."""
    vocab = logits.shape[1]
    temperature = _temperature(logits, params)
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p for p in params]
    total = _nucleus_total(logits, temperature, ks, top_p)
    width = width or min(max(k + 1 if k < vocab else NUCLEUS_WINDOW for k in ks), vocab)
    if width == vocab:
        scores = logits.float() / temperature  # [S, V]
        best = scores.sort(-1, descending=True).values
        return _inverse_cdf(scores.masked_fill(scores < _last_kept(best, ks, top_p, total), float("-inf")), uniforms)
    best, ids = torch.topk(logits, width, dim=-1)  # [S, W], best first
    best = best.float() / temperature
    best = best.masked_fill(best < _last_kept(best, ks, top_p, total), float("-inf"))
    ids, order = ids.sort(-1)  # id order, as the whole vocabulary's cumulative probabilities run
    tokens = ids.gather(1, _inverse_cdf(best.gather(1, order), uniforms)[:, None])[:, 0]
    if bool((edge := best[:, -1] > float("-inf")).any()):
        rows = edge.nonzero()[:, 0]
        tokens[rows] = _draw_cut(logits[rows], [params[r] for r in rows.tolist()], uniforms[rows], width=vocab)
    return tokens


def _nucleus_total(logits: torch.Tensor, temperature: torch.Tensor, ks: list[int], top_p: list[float]) -> torch.Tensor:
    """``[S, 1]``: what a top-p row without top-k measures its nucleus against: the unnormalized
    probabilities of its whole row (``exp`` of the gap to the best), summed once, whatever window
    it is cut in. Other rows: 1 (unused)."""
    total = torch.ones(len(ks), 1, device=logits.device)
    rows = [r for r, (k, p) in enumerate(zip(ks, top_p)) if k == logits.shape[1] and p < 1]
    if rows:
        scores = logits[rows].float() / temperature[rows]
        total[rows] = torch.exp(scores - scores.max(-1, keepdim=True).values).sum(-1, keepdim=True)
    return total


def _last_kept(best: torch.Tensor, ks: list[int], top_p: list[float], total: torch.Tensor) -> torch.Tensor:
    """``[S, 1]``: the last value each row of ``best [S, W]`` (best first) keeps: its top ``k``, then
    the fewest of those whose probability reaches ``top_p`` of the top-k's (vLLM's order), or of
    ``total`` for a row without top-k. The probabilities stay unnormalized (``exp`` of the gap to the
    best) and are summed by ``cumsum`` in order, so a row's figures do not depend on ``W``."""
    position = torch.arange(best.shape[1], device=best.device)[None, :]
    k = torch.tensor(ks, device=best.device)[:, None]
    p = torch.tensor([q if q < 1 else math.inf for q in top_p], device=best.device)[:, None]
    weights = torch.exp(best - best[:, :1]).masked_fill(position >= k, 0.0)  # [S, W]: the row's top-k
    mass = weights.cumsum(-1)
    total = torch.where(k < best.shape[1], mass[:, -1:], total)  # a top-k row: its k ids' own mass
    beyond = (mass - weights >= p * total) | (position >= k)  # after the nucleus is complete, or past k
    # >= 1: the best id is always kept (a top_p that rounds to 0 in float32 keeps the best id only)
    kept = (~beyond).sum(-1, keepdim=True).clamp(min=1)
    return best.gather(1, kept - 1)


def _inverse_cdf(scores: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``[S]``: the position in each row of ``scores [S, W]`` (-inf: never) where the running sum
    of ``exp(score)`` first reaches ``uniform`` times the row's total."""
    cdf = torch.exp(scores - scores.max(-1, keepdim=True).values).cumsum(-1)  # [S, W], unnormalized
    # At least the smallest float: a draw of exactly 0 must not land on a leading id of probability 0.
    target = (uniforms[:, None] * cdf[:, -1:]).clamp(min=torch.finfo(cdf.dtype).tiny)
    return torch.searchsorted(cdf, target).clamp(max=scores.shape[1] - 1)[:, 0]


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
