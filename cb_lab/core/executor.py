"""The compute phase of a step: turn a StepPlan into new K/V rows and tokens.

Two executors, same results (the oracle holds for both):

- ``SplitExecutor``, the classic data flow: all prefill chunks go through ONE ragged
  forward, then each decode token through its own ``forward_decode``. With 32 decoding
  requests that is 33 model calls, and the weights are read 33 times per step.
- ``FusedExecutor`` (the default), what vLLM v1, Sarathi-Serve and SGLang do: every token
  of the step, decode and prefill, in ONE flat batch and ONE ``forward_fused`` call. The
  weights are read once per step; that amortization is why batching raises throughput.

Either way a prefill chunk that starts at ``s > 0`` also attends to its request's cached
rows ``[0, s)``, so chunked prefill computes exactly what a one-shot prefill would. The
executors read requests and caches and write nothing: the scheduler stores the results in
its commit phase. They reach the model only through :class:`StepModel`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from cb_lab.attention.paged_attention import GatherWorkspace, PagedKV
from cb_lab.core.batch_builder import cached_prefix_mask
from cb_lab.core.kv_cache import BaseKVCache, check_rows, same_device, shared_paged
from cb_lab.core.output_rows import output_rows, prompt_logprobs
from cb_lab.core.plan import PrefillChunk, SeqOutput, StepPlan, StepResult
from cb_lab.core.request import Request
from cb_lab.exceptions import SchedulerError, ValidationError
from cb_lab.logits_processors import TokenHistory, has_penalties
from cb_lab.sampling import LogprobsTensors, SamplingParams, compute_logprobs, sample_batch

__all__ = [
    "EXECUTORS", "KV", "AttentionHook", "Executor", "FusedExecutor", "Sampled", "Sampler", "SplitExecutor", "StepModel",
    "check_fits_model",
]

Sampler = Callable[[torch.Tensor], torch.Tensor]  # output row [D] -> token [D]
Sampled = tuple[list[torch.Tensor], list[LogprobsTensors | None]]  # per row: its token, its logprobs (if asked)


KV = tuple[torch.Tensor, torch.Tensor]  # (K, V), each [rows, D]


class AttentionHook(Protocol):
    """Sees the attention probabilities of every call (``AttentionPlugin`` fits it)."""

    def on_attention(self, phase: str, weights: torch.Tensor) -> None: ...


class StepModel(Protocol):
    """The model interface a step needs (TinyLLM implements it)."""

    @property
    def token_shape(self) -> tuple[int, ...]:
        """One input token: ``(dim,)`` for vector tokens, ``()`` for token ids."""
        ...

    @property
    def kv_dim(self) -> int:
        """The width of one token's cached K (and V) row."""
        ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def forward_prefill_ragged(
        self,
        tokens: torch.Tensor,
        ragged_mask: torch.Tensor,
        past_kv: KV | None = None,
        *,
        attention_hooks: Sequence[AttentionHook] = (),
        output_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def forward_decode(
        self,
        new_token: torch.Tensor,
        kv_cache: BaseKVCache,
        *,
        attention_hooks: Sequence[AttentionHook] = (),
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def forward_fused(
        self,
        tokens: torch.Tensor,
        decode_kv: PagedKV | None,
        prefill_mask: torch.Tensor | None,
        prefill_past: KV | None = None,
        *,
        attention_hooks: Sequence[AttentionHook] = (),
        output_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def check_fits_model(model: StepModel, req: Request) -> None:
    """Raise SchedulerError unless ``req`` has the model's token shape, cache dim, device and dtype."""
    if req.token_shape != model.token_shape or req.kv_cache.dim not in (None, model.kv_dim):
        raise SchedulerError(
            f"request {req.req_id!r} has {_token_kind(req.token_shape)} (cache dim {req.kv_cache.dim}) but the "
            f"model has {_token_kind(model.token_shape)} (cache dim {model.kv_dim})"
        )
    if not (same_device(req.prompt.device, model.device) and same_device(req.kv_cache.device, model.device)):
        raise SchedulerError(
            f"request {req.req_id!r} (prompt on {req.prompt.device}, cache on {req.kv_cache.device}) "
            f"must be on the model's device {model.device}"
        )
    if req.dim and req.prompt.dtype != model.dtype:
        raise SchedulerError(
            f"request {req.req_id!r} has a {req.prompt.dtype} prompt but the model computes in "
            f"{model.dtype}; pass prompt.to({model.dtype})"
        )


def _token_kind(shape: tuple[int, ...]) -> str:
    return f"dim {shape[0]}" if shape else "token ids"


class Executor(ABC):
    """What both executors share: the model, the sampler, and the prefill inputs."""

    def __init__(
        self, model: StepModel, sampler: Sampler | None = None, attention_hooks: Sequence[AttentionHook] = ()
    ) -> None:
        self.model = model
        self.sampler = sampler
        self.attention_hooks = attention_hooks  # a live list: plugins registered later are seen
        self.num_model_calls = 0  # forward calls so far: the split path makes one per decode token

    @abstractmethod
    def run(self, plan: StepPlan) -> StepResult:
        """Compute a step: new K/V rows and sampled tokens, in plan order. Writes nothing."""

    def sample(self, row: torch.Tensor, req: Request) -> torch.Tensor:
        """Output row -> the token that is recorded and fed back.

        A request with ``sampling`` (token ids) draws from its logits row by its own params;
        a vector token is ``sampler(row)``, or the row itself without a sampler.
        """
        if req.sampling is not None:
            return self.sample_rows(row[None], [req])[0][0]
        if self.sampler is None:
            return row.clone()  # a view would keep the step's whole [N, D] output alive as long as the token
        token = self.sampler(row)
        # Checked here, in compute: a bad token found at commit would come after K/V were stored.
        if not isinstance(token, torch.Tensor) or token.shape != row.shape:
            got = tuple(token.shape) if isinstance(token, torch.Tensor) else type(token).__name__
            raise ValidationError(f"the sampler must map a {tuple(row.shape)} row to the same shape, got {got}")
        if token.dtype != row.dtype or token.device != row.device:
            raise ValidationError(
                f"the sampler must return {row.dtype} on {row.device} like its input row, got {token.dtype} on "
                f"{token.device}"
            )
        if not bool(torch.isfinite(token).all()):
            raise ValidationError("the sampler returned NaN or inf; it must map a row to finite values")
        return token

    def _checked_kv(self, k: object, v: object, num_rows: int) -> KV:
        """The model's new K/V rows, checked once for the whole call: the commit stores them without checking
        each request's rows again."""
        return check_rows(k, v, self.model.kv_dim, self.model.device, "the model's KV cache", num_rows)

    def _prefill_inputs(self, chunks: Sequence[PrefillChunk]) -> tuple[torch.Tensor, torch.Tensor, KV | None]:
        """Chunk rows ``[P, D]``, their mask ``[P, C + P]`` and cached prefixes ``[C, D]`` (None if all start at 0)."""
        device = self.model.device
        tokens = torch.cat([c.request.prefill_rows[c.start : c.end] for c in chunks])
        starts = torch.tensor([c.start for c in chunks], device=device)
        lengths = torch.tensor([c.length for c in chunks], device=device)
        cached = [prefix_rows(c) for c in chunks if c.start > 0]
        past = (torch.cat([k for k, _ in cached]), torch.cat([v for _, v in cached])) if cached else None
        return tokens, cached_prefix_mask(starts, lengths), past

    def sample_rows(self, out: torch.Tensor, reqs: Sequence[Request]) -> Sampled:
        """Row ``i`` of ``out`` -> request ``i``'s token and, if it asks, its logprobs. Token-id requests
        are sampled as one batch (``sample_batch``: each still draws from its own generator, after its
        own min_tokens and penalties); vector tokens row by row."""
        if reqs and all(r.sampling is not None for r in reqs):
            params = [r.sampling for r in reqs if r.sampling is not None]
            history = [_history(r) if has_penalties(p) else None for r, p in zip(reqs, params)]
            tokens = sample_batch(out, params, [r.req_id for r in reqs], [len(r.generated_tokens) for r in reqs],
                                  history=history, eos_token_ids=[r.eos_token_id for r in reqs])
            return list(tokens), _token_logprobs(out, tokens, params)
        if self.sampler is None and reqs:  # the output rows are the tokens fed back: checked once for the call
            self._check_token_rows(out, len(reqs))
        return [self.sample(row, req) for row, req in zip(out, reqs)], [None] * len(reqs)

    def _check_token_rows(self, out: torch.Tensor, num_rows: int) -> None:
        want = (num_rows, *self.model.token_shape)
        if tuple(out.shape) != want or out.dtype != self.model.dtype or not bool(torch.isfinite(out).all()):
            raise ValidationError(f"the model's output rows are the tokens fed back: they must be {want} finite "
                                  f"{self.model.dtype}, got {tuple(out.shape)} {out.dtype} (NaN or inf included?)")

    @staticmethod
    def _outputs(chunks: Sequence[PrefillChunk], sampled: Sampled, prompt: Sequence[LogprobsTensors | None],
                 k: torch.Tensor, v: torch.Tensor) -> tuple[SeqOutput, ...]:
        """Split a prefill batch's K/V back per chunk; ``sampled`` holds one token (and its logprobs) per
        chunk that ends its prompt, in chunk order; ``prompt`` one entry per chunk."""
        sizes, tokens, logprobs = [c.length for c in chunks], iter(sampled[0]), iter(sampled[1])
        outputs = []
        for chunk, k_c, v_c, lp in zip(chunks, torch.split(k, sizes), torch.split(v, sizes), prompt):
            ends = chunk.completes_prompt
            outputs.append(SeqOutput(k_c, v_c, next(tokens) if ends else None, next(logprobs) if ends else None, lp))
        return tuple(outputs)

    @staticmethod
    def _completing(chunks: Sequence[PrefillChunk]) -> list[Request]:
        """The requests whose chunk ends their prompt: they get their first token this step."""
        return [c.request for c in chunks if c.completes_prompt]


class SplitExecutor(Executor):
    """One ragged forward for the step's prefill chunks, one ``forward_decode`` per decode token."""

    def run(self, plan: StepPlan) -> StepResult:
        prefill: tuple[SeqOutput, ...] = ()
        if plan.prefill:
            tokens, mask, past = self._prefill_inputs(plan.prefill)
            rows = output_rows(plan.prefill, 0, self.model.device)  # only these get logits (core/output_rows.py)
            out, k, v = self.model.forward_prefill_ragged(tokens, mask, past, attention_hooks=self.attention_hooks,
                                                          output_rows=rows.rows)
            self.num_model_calls += 1
            k, v = self._checked_kv(k, v, len(tokens))
            sampled = self.sample_rows(rows.tokens(out), self._completing(plan.prefill))
            prefill = self._outputs(plan.prefill, sampled, prompt_logprobs(out, rows, plan.prefill), k, v)
        decode = tuple(self._run_decode(req) for req in plan.decode)
        return StepResult(prefill, decode)

    def _run_decode(self, req: Request) -> SeqOutput:
        out, k, v = self.model.forward_decode(req.last_token, req.kv_cache, attention_hooks=self.attention_hooks)
        self.num_model_calls += 1
        k, v = self._checked_kv(k, v, 1)
        (token,), (logprobs,) = self.sample_rows(out[:1], [req])
        return SeqOutput(k, v, token, logprobs)


class FusedExecutor(Executor):
    """Every token of the step in one flat batch ``[decode rows | prefill rows]`` and one forward."""

    def __init__(
        self, model: StepModel, sampler: Sampler | None = None, attention_hooks: Sequence[AttentionHook] = ()
    ) -> None:
        super().__init__(model, sampler, attention_hooks)
        self.workspace = GatherWorkspace()  # paged attention's gather buffers, reused every step

    def run(self, plan: StepPlan) -> StepResult:
        parts, decode_kv, mask, past = [], None, None, None
        if plan.decode:
            parts.append(torch.stack([r.last_token for r in plan.decode]))  # [B, D]
            decode_kv = decode_inputs([r.kv_cache for r in plan.decode], self.model.device, self.workspace)
        if plan.prefill:
            tokens, mask, past = self._prefill_inputs(plan.prefill)
            parts.append(tokens)  # [P, D]
        if not parts:  # only zero-token requests finishing: nothing to compute
            return StepResult((), ())
        B = len(plan.decode)
        rows = output_rows(plan.prefill, B, self.model.device)  # only these get logits (core/output_rows.py)
        flat = torch.cat(parts)  # [B + P, D]
        out, k, v = self.model.forward_fused(
            flat, decode_kv, mask, past, attention_hooks=self.attention_hooks, output_rows=rows.rows,
        )
        self.num_model_calls += 1
        k, v = self._checked_kv(k, v, len(flat))
        # One token per token row: the decodes', then those of the chunks that end their prompt.
        drawn, logprobs = self.sample_rows(rows.tokens(out), [*plan.decode, *self._completing(plan.prefill)])
        rows_k, rows_v = torch.split(k[:B], 1), torch.split(v[:B], 1)  # [1, D] views, one call each (not 2B slicings)
        decode = tuple(map(SeqOutput, rows_k, rows_v, drawn[:B], logprobs[:B]))
        prefill = self._outputs(plan.prefill, (drawn[B:], logprobs[B:]), prompt_logprobs(out, rows, plan.prefill),
                                k[B:], v[B:]) if plan.prefill else ()
        return StepResult(prefill, decode)


EXECUTORS: dict[str, type[Executor]] = {"fused": FusedExecutor, "split": SplitExecutor}


def _history(req: Request) -> TokenHistory:
    """The prompt ids ``[L]`` and output ids ``[n]`` a request's penalties count."""
    output = torch.stack(req.generated_tokens) if req.generated_tokens else req.prompt.new_empty(0)
    return req.prompt, output


def _token_logprobs(out: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams]) -> list[
        LogprobsTensors | None]:
    """Per row, the raw logprobs of its token and its ``logprobs`` best ids, for the rows that ask (one
    batch, moved to the CPU once; each with the batch's widest ``k``)."""
    asked = [r for r, p in enumerate(params) if p.logprobs is not None]
    if not asked:
        return [None] * len(params)
    rows = torch.tensor(asked, device=out.device)
    computed = compute_logprobs(out[rows], tokens[rows], max(params[r].logprobs or 0 for r in asked)).to("cpu")
    found: list[LogprobsTensors | None] = [None] * len(params)
    for j, r in enumerate(asked):
        found[r] = computed[j : j + 1]
    return found


def prefix_rows(chunk: PrefillChunk) -> KV:
    """The K/V rows ``[start, D]`` a chunk attends to before its own: its cache's, or (an admission
    with a prefix-cache hit, not adopted until commit) the cached blocks' straight from the pool."""
    cache = chunk.request.kv_cache
    if not chunk.cached_blocks:
        assert len(cache) == chunk.start, "a prefilling cache holds exactly prefill_pos rows"
        return cache.get_kv()
    pool = cache.shared_pool  # only a cache on a shared pool has prefix-cache hits
    assert pool is not None and len(cache) == 0, "a hit starts an empty cache on a shared pool"
    return pool.read(torch.tensor(chunk.cached_blocks, device=pool.device))


def decode_inputs(
    caches: Sequence[BaseKVCache], device: torch.device, workspace: GatherWorkspace | None = None
) -> PagedKV:
    """Where B decode rows find their cached K/V, as one ``PagedKV``.

    Caches sharing one block pool are read in place through their block tables (padded
    with block 0, masked by ``context_lens``). Other caches are copied into one padded
    ``[B, S, D]`` tensor, each request's rows as a single block of a one-layer pool (``[1, B, S, D]``).
    """
    lens = torch.tensor([len(c) for c in caches], device=device)
    pool = caches[0].shared_pool
    paged = [shared_paged(c) for c in caches]
    if pool is not None and all(c is not None and c.pool is pool for c in paged):
        tables = [c.block_table for c in paged if c is not None]  # all of them (the filter is for the types)
        width = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device)
        return PagedKV(pool.key_cache, pool.value_cache, padded, lens, workspace)
    rows = [c.get_kv() for c in caches]
    keys = torch.nn.utils.rnn.pad_sequence([k for k, _ in rows], batch_first=True)  # [B, S, D]
    values = torch.nn.utils.rnn.pad_sequence([v for _, v in rows], batch_first=True)
    return PagedKV(keys[None], values[None], torch.arange(len(caches), device=device)[:, None], lens)
