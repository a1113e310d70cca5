"""The compute phase of a step: turn a StepPlan into new K/V rows and tokens.

``SplitExecutor`` follows the classic data flow:

1. all prefill chunks of the step go through ONE ragged forward. A chunk that starts
   at ``s > 0`` also attends to its request's cached rows ``[0, s)``, so chunked prefill
   computes exactly what a one-shot prefill would;
2. each decode token then goes through its own ``forward_decode`` against its cache.

It reads requests and caches and writes nothing: the scheduler stores the results in
its commit phase. It reaches the model only through :class:`StepModel`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from cb_lab.core.batch_builder import cached_prefix_mask
from cb_lab.core.kv_cache import BaseKVCache
from cb_lab.core.plan import PrefillChunk, SeqOutput, StepPlan, StepResult
from cb_lab.core.request import Request
from cb_lab.exceptions import ValidationError
from cb_lab.model.tiny_llm import KV, AttentionHook

__all__ = ["Sampler", "SplitExecutor", "StepModel"]

Sampler = Callable[[torch.Tensor], torch.Tensor]  # output row [D] -> token [D]


class StepModel(Protocol):
    """The model interface a step needs (TinyLLM implements it)."""

    @property
    def dim(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def forward_prefill_ragged(
        self,
        tokens: torch.Tensor,
        ragged_mask: torch.Tensor,
        past_kv: KV | None = None,
        *,
        attention_hooks: Sequence[AttentionHook] = (),
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def forward_decode(
        self,
        new_token: torch.Tensor,
        kv_cache: BaseKVCache,
        *,
        attention_hooks: Sequence[AttentionHook] = (),
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class SplitExecutor:
    """One ragged forward for the step's prefill chunks, one ``forward_decode`` per decode token."""

    def __init__(
        self,
        model: StepModel,
        sampler: Sampler | None = None,
        attention_hooks: Sequence[AttentionHook] = (),
    ) -> None:
        self.model = model
        self.sampler = sampler
        self.attention_hooks = attention_hooks  # a live list: plugins registered later are seen

    def run(self, plan: StepPlan) -> StepResult:
        prefill = self._run_prefill(plan.prefill) if plan.prefill else ()
        decode = tuple(self._run_decode(req) for req in plan.decode)
        return StepResult(prefill, decode)

    def sample(self, row: torch.Tensor) -> torch.Tensor:
        """Output row ``[D]`` -> the token that is recorded and fed back (identity without a sampler)."""
        if self.sampler is None:
            return row
        token = self.sampler(row)
        if not isinstance(token, torch.Tensor) or token.shape != row.shape:
            got = tuple(token.shape) if isinstance(token, torch.Tensor) else type(token).__name__
            raise ValidationError(f"the sampler must map a {tuple(row.shape)} row to the same shape, got {got}")
        return token

    def _run_prefill(self, chunks: Sequence[PrefillChunk]) -> tuple[SeqOutput, ...]:
        device = self.model.device
        tokens = torch.cat([c.request.prompt[c.start : c.end] for c in chunks])  # [N, D]
        starts = torch.tensor([c.start for c in chunks], device=device)  # [B]
        lengths = torch.tensor([c.length for c in chunks], device=device)  # [B]
        # Chunk b also sees its request's cached rows [0, start_b): key columns are [C + N].
        mask = cached_prefix_mask(starts, lengths)  # [N, C + N]
        out, k, v = self.model.forward_prefill_ragged(
            tokens, mask, self._cached_prefixes(chunks), attention_hooks=self.attention_hooks
        )
        sizes = [c.length for c in chunks]
        outputs = []
        for chunk, out_c, k_c, v_c in zip(chunks, torch.split(out, sizes), torch.split(k, sizes), torch.split(v, sizes)):
            token = self.sample(out_c[-1]) if chunk.completes_prompt else None
            outputs.append(SeqOutput(k_c, v_c, token))
        return tuple(outputs)

    def _cached_prefixes(self, chunks: Sequence[PrefillChunk]) -> KV | None:
        """``(K [C, D], V [C, D])`` of every chunk's cached rows, or None when all start at 0."""
        cached = [c.request.kv_cache.get_kv() for c in chunks if c.start > 0]
        for chunk in chunks:
            assert len(chunk.request.kv_cache) == chunk.start, "a prefilling cache holds exactly prefill_pos rows"
        if not cached:
            return None
        return torch.cat([k for k, _ in cached]), torch.cat([v for _, v in cached])

    def _run_decode(self, req: Request) -> SeqOutput:
        out, k, v = self.model.forward_decode(req.last_token, req.kv_cache, attention_hooks=self.attention_hooks)
        return SeqOutput(k, v, self.sample(out[0]))
