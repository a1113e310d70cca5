"""Request: one prompt's journey through prefill, decode, and finish.

A request's sequence is its prompt rows followed by the tokens it generates::

    prompt  p0 p1 ... p(L-1) | generated g1 g2 ... gn
    prefill: prompt chunks [prefill_pos, prefill_pos + n) fill the KV cache
    the output at p(L-1) is g1 (also the ``decode_seed``, the first decode input)
    decode:  feed g(i), attend over the cache and itself, output is g(i+1)

It is finished once it holds ``max_new_tokens`` generated tokens; its cache then holds
``L + max_new_tokens - 1`` rows (the last token is never fed back), unless the cache draws
from a shared block pool: then the scheduler gives its blocks back at once. A request
with ``max_new_tokens == 0`` is finished from the start.

A step changes a request only in its commit phase (its plan reads ``prefill_pos`` and
``prefill_rows`` and consumes nothing), so a step that fails can be planned again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cb_lab.checks import check_int
from cb_lab.core.block_pool import block_hashes
from cb_lab.core.kv_cache import BaseKVCache, shared_paged
from cb_lab.core.view_registry import render
from cb_lab.exceptions import RequestError, ValidationError
from cb_lab.sampling import LogprobsTensors, SamplingParams

__all__ = ["Request"]


def _check_prompt(req_id: str, prompt: object) -> None:
    if not isinstance(prompt, torch.Tensor):
        raise ValidationError(f"request {req_id!r}: prompt must be a torch.Tensor, got {type(prompt).__name__}")
    if prompt.dim() == 1 and prompt.dtype == torch.long and prompt.shape[0] > 0:
        if int(prompt.min()) < 0:
            raise ValidationError(f"request {req_id!r}: token ids must be >= 0, got {int(prompt.min())}")
        return  # token ids (a token model)
    if prompt.dim() != 2 or prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ValidationError(
            f"request {req_id!r}: prompt must be a non-empty [seq_len, dim] float tensor (vector tokens) or "
            f"[seq_len] int64 token ids, got shape {tuple(prompt.shape)} {prompt.dtype}"
        )
    if not prompt.is_floating_point():
        raise ValidationError(f"request {req_id!r}: prompt must be floating point, got {prompt.dtype}")
    if not bool(torch.isfinite(prompt).all()):
        raise ValidationError(f"request {req_id!r}: prompt contains NaN or inf; pass finite values")


def _check_id(req_id: object) -> None:
    if not isinstance(req_id, str) or not req_id:
        raise ValidationError(f"req_id must be a non-empty str, got {req_id!r}")


def _check_sampling(req_id: str, sampling: object, prompt: torch.Tensor) -> None:
    """``SamplingParams`` or None, and only over token ids: a vector token is its output row (no logits)."""
    if sampling is not None and not isinstance(sampling, SamplingParams):
        raise ValidationError(f"request {req_id!r}: sampling must be SamplingParams, got {sampling!r}")
    if sampling is not None and prompt.dim() != 1:
        raise ValidationError(f"request {req_id!r}: sampling is for token ids ([seq_len] prompts); a vector-token "
                              "request takes its output row (or the Scheduler's sampler): pass sampling=None")


@dataclass(eq=False, repr=False)
class Request:
    """One inference request: a prompt (``[seq_len, dim]`` vectors or ``[seq_len]`` token ids), a token
    budget, and its KV cache."""

    req_id: str
    prompt: torch.Tensor
    max_new_tokens: int
    kv_cache: BaseKVCache
    prefill_pos: int = 0
    generated_tokens: list[torch.Tensor] = field(default_factory=list)
    finished: bool = False
    decode_seed: torch.Tensor | None = None
    num_preemptions: int = 0
    aborted: bool = False
    sampling: SamplingParams | None = None  # token ids: how to pick each token from the logits
    eos_token_id: int | None = None  # token ids: the id that ends the request (see SamplingParams.stops)
    finish_reason: str | None = None  # "length", "stop" or "abort" once finished
    parent_id: str | None = None  # a fork: the request it was forked from
    stop_reason: int | None = field(default=None, init=False)  # the stop id that ended it (None: EOS or length)
    # With SamplingParams.logprobs: one [1, 1 + k] entry per generated token (column 0: the token itself).
    logprobs: list[LogprobsTensors] = field(default_factory=list, init=False, repr=False)
    # With SamplingParams.prompt_logprobs: per prefill chunk, rows for positions 0, 1, ... in order; the row
    # of position p holds the logprob of prompt token p + 1.
    prompt_logprobs: list[LogprobsTensors] = field(default_factory=list, init=False, repr=False)
    # What prefill runs over: the prompt, or after a preemption prompt + the tokens generated so far.
    _prefill_rows: torch.Tensor = field(init=False, repr=False)
    _hashes: tuple[int, list[int]] = field(init=False, repr=False, default=(0, []))  # (block size, hashes)

    def __post_init__(self) -> None:
        _check_id(self.req_id)
        _check_prompt(self.req_id, self.prompt)
        _check_sampling(self.req_id, self.sampling, self.prompt)
        n = check_int(f"request {self.req_id!r}: max_new_tokens", self.max_new_tokens, 0, ValidationError)
        if not isinstance(self.kv_cache, BaseKVCache):
            raise ValidationError(
                f"request {self.req_id!r}: kv_cache must be a BaseKVCache (DenseKVCache or PagedKVCache), "
                f"got {type(self.kv_cache).__name__}"
            )
        p = self.prefill_pos
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= self.prompt_len:
            raise ValidationError(
                f"request {self.req_id!r}: prefill_pos must be an int in [0, {self.prompt_len}], got {p!r}"
            )
        if self.sampling is None and self.prompt.dim() == 1:  # token ids: greedy unless told otherwise
            self.sampling = SamplingParams(max_tokens=n, temperature=0.0)
        if len(self.generated_tokens) >= n:
            self.finished = True
            self.finish_reason = "length"
        self._prefill_rows = self.prompt

    @property
    def prompt_len(self) -> int:
        return self.prompt.shape[0]

    @property
    def dim(self) -> int:
        """The width of a vector token; 0 for token ids."""
        return self.prompt.shape[1] if self.prompt.dim() == 2 else 0

    @property
    def token_shape(self) -> tuple[int, ...]:
        """One token's shape: ``(dim,)`` for vector tokens, ``()`` for a token id."""
        return tuple(self.prompt.shape[1:])

    @property
    def prefill_rows(self) -> torch.Tensor:
        """``[prefill_len, dim]``: the prompt, or after a preemption the prompt + every token generated so far."""
        return self._prefill_rows

    @property
    def prefill_len(self) -> int:
        return self._prefill_rows.shape[0]

    @property
    def in_prefill(self) -> bool:
        """True while prefill rows remain to be run (never for a finished request)."""
        return not self.finished and self.prefill_pos < self.prefill_len

    @property
    def in_decode(self) -> bool:
        """True once the prefill is done and tokens remain to be generated."""
        return not self.finished and self.prefill_pos == self.prefill_len

    @property
    def last_token(self) -> torch.Tensor:
        """The next decode input ``[dim]``: the latest generated token."""
        if not self.generated_tokens:
            raise RequestError(f"request {self.req_id!r} has generated no token yet; finish its prefill first")
        return self.generated_tokens[-1]

    @property
    def num_prompt_logprobs(self) -> int:
        """Prompt positions whose next token's logprobs are recorded so far."""
        return sum(len(chunk) for chunk in self.prompt_logprobs)

    def prompt_logprob_positions(self, start: int, end: int) -> range:
        """The positions of prefill rows ``[start, end)`` whose prompt logprobs are still to come: none
        without ``prompt_logprobs``, and never the last prompt row (its logits draw the first token)."""
        if self.sampling is None or self.sampling.prompt_logprobs is None:
            return range(0)
        return range(max(start, self.num_prompt_logprobs), min(end, self.prompt_len - 1))

    def block_hashes(self, block_size: int) -> list[int]:
        """The chained hashes of the full blocks of ``prefill_rows`` (prefix caching; computed once)."""
        if self._hashes[0] != block_size:
            self._hashes = (block_size, block_hashes(self._prefill_rows, block_size))
        return self._hashes[1]

    def get_prefill_chunk(self, chunk_size: int) -> torch.Tensor:
        """The next ``[<= chunk_size, dim]`` prompt rows from ``prefill_pos`` (a pure read; a view)."""
        check_int("chunk_size", chunk_size, 1, ValidationError)
        return self._prefill_rows[self.prefill_pos : self.prefill_pos + chunk_size]

    def preempt(self) -> None:
        """Drop the cached K/V and start over (vLLM's recompute preemption).

        The request keeps its generated tokens. Its next prefill runs over the prompt plus
        all of them; the output at the last row is the next token, exactly what the decode
        it missed would have produced.
        """
        self.kv_cache.release()
        self.prefill_pos = 0
        self.num_preemptions += 1
        if self.generated_tokens:
            self._prefill_rows = self._prompt_and(self.generated_tokens)
            self._hashes = (0, [])

    def _prompt_and(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """The prompt with ``tokens`` appended as rows (what a recompute runs over)."""
        return torch.cat([self.prompt, torch.stack(tokens).to(self.prompt.dtype)]) if tokens else self.prompt

    def fork(self, req_id: str, sampling: SamplingParams | None = None) -> Request:
        """A new request that continues this one's sequence from its latest token, drawn again.

        It shares every cached K/V row but the last (``PagedKVCache.fork``: nothing is copied)
        and recomputes that row as a one-row prefill, so its next token is its own draw (its
        ``sampling``, its own id's random stream): parallel sampling (``SamplingParams.n``). That
        first write lands in the shared last block and copies it (copy-on-write)::

            parent  [p0 p1 p2 | p3 g0 g1 .]   blocks A B (B partial, shared)
            child   [p0 p1 p2 | p3 g0 ...]    shares A and B, recomputes g0, draws its own g1'
        """
        _check_id(req_id)  # before the cache forks: a refused fork holds no block
        _check_sampling(req_id, sampling, self.prompt)
        cache = shared_paged(self.kv_cache)
        if cache is None:
            raise RequestError(f"request {self.req_id!r} has a private cache; forking needs a PagedKVCache on a "
                               "shared BlockPool")
        if self.prefill_pos < self.prefill_len or not self.generated_tokens:
            raise RequestError(f"request {self.req_id!r} can fork once its prefill is done and it has a token, "
                               f"not yet: {self!r}")
        kept = self.generated_tokens[:-1]  # the latest token is drawn again by the child
        rows = self._prompt_and(kept)
        assert len(cache) == rows.shape[0], "a decoding cache holds every row but the latest token"
        child = Request(req_id, self.prompt, self.max_new_tokens, cache.fork(rows.shape[0] - 1),
                        sampling=sampling or self.sampling, eos_token_id=self.eos_token_id, parent_id=self.req_id)
        child.generated_tokens, child.decode_seed = list(kept), self.decode_seed if kept else None
        child.logprobs = self.logprobs[: len(kept)]
        child._prefill_rows, child.prefill_pos = rows, rows.shape[0] - 1
        return child

    def new_sample(self, req_id: str, sampling: SamplingParams) -> Request:
        """A new request over this one's prompt, from scratch, on an empty cache of the same pool: a
        sample of ``SamplingParams.n`` that waits for room to run (``Scheduler`` forks the others)."""
        _check_id(req_id)
        _check_sampling(req_id, sampling, self.prompt)
        cache = shared_paged(self.kv_cache)
        if cache is None:
            raise RequestError(f"request {self.req_id!r} has a private cache; its samples need a PagedKVCache on a "
                               "shared BlockPool")
        return Request(req_id, self.prompt, self.max_new_tokens, cache.fork(0), sampling=sampling,
                       eos_token_id=self.eos_token_id, parent_id=self.req_id)

    def append_kv(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Store new K/V rows ``[n, dim]`` in this request's cache."""
        self.kv_cache.append(k_new, v_new)

    def append_token(self, tok: torch.Tensor, logprobs: LogprobsTensors | None = None) -> None:
        """Record a generated token (``[dim]`` or ``[1, dim]``, or a 0-d token id) and its ``logprobs``.

        The request finishes at ``max_new_tokens`` (``finish_reason`` "length") or, with
        ``sampling`` and at least ``min_tokens`` tokens, at a stop id (``stop_reason``) or its EOS ("stop").
        """
        if self.finished:
            held = f"{len(self.generated_tokens)} of {self.max_new_tokens} tokens"
            raise RequestError(f"request {self.req_id!r} is finished ({self.finish_reason}, {held}); it takes no more")
        dim = self.dim  # read once: every step calls this for every token
        shape, ok = ((dim,), ((dim,), (1, dim))) if dim else ((), ((),))
        if not isinstance(tok, torch.Tensor) or tuple(tok.shape) not in ok:
            got = tuple(tok.shape) if isinstance(tok, torch.Tensor) else type(tok).__name__
            raise ValidationError(f"request {self.req_id!r}: a token must have shape {' or '.join(map(str, ok))}, "
                                  f"got {got}")
        if tok.is_floating_point() != bool(dim):
            want = "floating point" if dim else "an int64 token id"
            raise ValidationError(f"request {self.req_id!r}: a token must be {want}, got {tok.dtype}")
        self.record_token(tok if tok.dim() == len(shape) else tok.reshape(shape), logprobs)

    def record_token(self, token: torch.Tensor, logprobs: LogprobsTensors | None = None) -> None:
        """``append_token`` of a token known to be well formed (``[dim]`` or a 0-d id): the scheduler's
        commit records what its executor checked, so every step skips the checks for every token."""
        if self.decode_seed is None:
            self.decode_seed = token
        self.generated_tokens.append(token)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        params = self.sampling
        if params is not None and len(self.generated_tokens) >= params.min_tokens and params.stops(
                int(token), self.eos_token_id):
            self.finished, self.finish_reason = True, "stop"
            is_eos = not params.ignore_eos and int(token) == self.eos_token_id
            self.stop_reason = None if is_eos else int(token)  # vLLM: the stop id, None for the EOS
        elif len(self.generated_tokens) >= self.max_new_tokens:
            self.finished, self.finish_reason = True, "length"

    @property
    def phase(self) -> str:
        """``prefill``, ``decode``, ``finished`` or ``aborted``."""
        if self.aborted or self.finished:
            return "aborted" if self.aborted else "finished"
        return "prefill" if self.in_prefill else "decode"

    def __repr__(self) -> str:
        return (
            f"Request({self.req_id!r}, {self.phase}, prefill={self.prefill_pos}/{self.prefill_len}, "
            f"generated={len(self.generated_tokens)}/{self.max_new_tokens}, cache_len={len(self.kv_cache)})"
        )

    def _repr_html_(self) -> str:
        return render(self)
