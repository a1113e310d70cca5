"""``LlamaModel`` behind the scheduler's model interface: the same step, real tokens.

The executors (``core/executor.py``) talk to a ``StepModel``: ``forward_prefill_ragged``,
``forward_decode`` and ``forward_fused``, with cache rows of width ``kv_dim``. For a
Llama-architecture model one cached row holds a token's keys of every layer side by side::

    row [kv_dim] = [n_layers, n_kv_heads, head_dim] flattened      (values the same way)

so one block table serves every layer, and caches, the shared block pool, preemption and commit
work unchanged. The pool stores the rows layer by layer (``BlockPool(..., num_layers=n_layers)``,
as ``LLMEngine`` makes it: ``key_cache [n_layers, num_blocks, block_size, G * d]``), so a layer's
decode attention gathers contiguous blocks of that layer. A one-layer pool of whole rows (dense
caches padded into blocks, a pool made without ``num_layers``) works too: a layer is then a
strided slice of each row. Positions for RoPE come with the step: a decode row sits at its
request's cached length; a prefill row's mask lets it see exactly its own request's keys at
positions up to its own, so its position is the number of keys it sees, minus one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch

from cb_lab.attention.paged_attention import PagedKV, decode_buckets, paged_attention_heads
from cb_lab.core.kv_cache import BaseKVCache
from cb_lab.exceptions import ModelError
from cb_lab.model.llama import LayerKV, LlamaModel
from cb_lab.model.llama_layers import DecoderLayer, rope_cos_sin
from cb_lab.model.prefill_chunks import chunked_attention, prefill_chunks

__all__ = ["LlamaStepModel"]

KV = tuple[torch.Tensor, torch.Tensor]


class LlamaStepModel:
    """Runs a ``LlamaModel`` for the scheduler: token ids in, logits out, K/V as flat cache rows."""

    token_shape: tuple[int, ...] = ()  # a token is an id

    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        c = model.config
        self.layer_shape = (c.n_layers, c.n_kv_heads, c.head_size)

    @property
    def kv_dim(self) -> int:
        L, G, d = self.layer_shape
        return L * G * d

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def _layers(self, rows: torch.Tensor) -> torch.Tensor:
        """Cache rows ``[C, kv_dim]`` as ``[C, n_layers, G, d]`` (a view)."""
        return rows.view(rows.shape[0], *self.layer_shape)

    def _past(self, past_kv: KV | None) -> list[LayerKV] | None:
        if past_kv is None:
            return None
        keys, values = self._layers(past_kv[0]), self._layers(past_kv[1])
        return [(keys[:, i], values[:, i]) for i in range(self.layer_shape[0])]

    def _layer_blocks(self, cache: torch.Tensor, layer: int) -> torch.Tensor:
        """One layer's blocks ``[num_blocks, block_size, G, d]`` of a pool tensor ``[pool layers, num_blocks,
        block_size, width]`` (a view)."""
        L, G, d = self.layer_shape
        if cache.shape[0] == L:  # layer-major: the layer's blocks are contiguous
            return cache[layer].view(*cache.shape[1:3], G, d)
        assert cache.shape[0] == 1, f"a pool of {cache.shape[0]} layers for a model of {L}"
        return cache[0].view(*cache.shape[1:3], L, G, d)[:, :, layer]  # whole rows: a strided slice of each

    @staticmethod
    def _rows(per_layer: torch.Tensor) -> torch.Tensor:
        """New K (or V) ``[n_layers, N, G, d]`` as cache rows ``[N, kv_dim]``."""
        return per_layer.permute(1, 0, 2, 3).reshape(per_layer.shape[1], -1)

    @staticmethod
    def _no_hooks(hooks: Sequence[Any]) -> None:
        if hooks:
            raise ModelError("LlamaStepModel reports no attention weights; use attention plugins with TinyLLM")

    @torch.no_grad()
    def forward_prefill_ragged(
        self, tokens: torch.Tensor, ragged_mask: torch.Tensor, past_kv: KV | None = None, *,
        attention_hooks: Sequence[Any] = (), output_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits ``[P, vocab]`` (``[len(output_rows), vocab]``) and K/V rows ``[P, kv_dim]`` of prefill
        chunks (``ragged_mask [P, C + P]``)."""
        self._no_hooks(attention_hooks)
        positions = ragged_mask.sum(-1) - 1  # [P]: the keys a row sees are its request's positions 0..its own
        logits, k, v = self.model(tokens, positions, ragged_mask, self._past(past_kv), output_rows=output_rows)
        return logits, self._rows(k), self._rows(v)

    @torch.no_grad()
    def forward_decode(
        self, new_token: torch.Tensor, kv_cache: BaseKVCache, *, attention_hooks: Sequence[Any] = ()
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token id against its request's cache: logits ``[1, vocab]``, K/V rows ``[1, kv_dim]``."""
        self._no_hooks(attention_hooks)
        past = kv_cache.get_kv()
        C = past[0].shape[0]
        mask = torch.ones(1, C + 1, dtype=torch.bool, device=self.device)
        logits, k, v = self.model(new_token.reshape(1), torch.tensor([C], device=self.device), mask, self._past(past))
        return logits, self._rows(k), self._rows(v)

    @torch.no_grad()
    def forward_fused(
        self, tokens: torch.Tensor, decode_kv: PagedKV | None, prefill_mask: torch.Tensor | None,
        prefill_past: KV | None = None, *, attention_hooks: Sequence[Any] = (),
        output_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A whole step, ``tokens [B decode | P prefill]``: each layer's projections run once over all rows;
        the LM head only over ``output_rows`` (the rows that sample a token), when given."""
        self._no_hooks(attention_hooks)
        m, B = self.model, 0 if decode_kv is None else decode_kv.num_rows
        positions = torch.cat([
            decode_kv.context_lens if decode_kv is not None else tokens.new_empty(0),
            prefill_mask.sum(-1) - 1 if prefill_mask is not None else tokens.new_empty(0),
        ])
        if positions.shape[0] != tokens.shape[0]:
            raise ModelError(f"forward_fused got {tokens.shape[0]} rows but {B} decode rows and "
                             f"{positions.shape[0] - B} prefill mask rows; every row needs one of them")
        m._check(tokens, positions)
        cos, sin = rope_cos_sin(positions, m.config.head_size, m.config.rope_theta)
        past = self._past(prefill_past)
        if prefill_mask is not None:  # the chunks, read off the mask once: each attends over its own keys only
            chunks = prefill_chunks(prefill_mask)
        if decode_kv is not None:
            # Rows grouped by length once for the step; every layer gathers through the same buckets.
            buckets = decode_buckets(decode_kv.block_tables, decode_kv.context_lens, decode_kv.key_cache.shape[2])
        x = m.embed_tokens(tokens)  # [N, D]
        new_keys, new_values = [], []
        for i, layer in enumerate(cast(Sequence[DecoderLayer], m.layers)):
            q, k, v = layer.project_kv(x, cos, sin)  # every weight of the layer read once for the whole step
            parts = []
            if decode_kv is not None:
                parts.append(paged_attention_heads(q[:B], self._layer_blocks(decode_kv.key_cache, i),
                                                   self._layer_blocks(decode_kv.value_cache, i),
                                                   decode_kv.block_tables, decode_kv.context_lens, k[:B], v[:B],
                                                   buckets=buckets, workspace=decode_kv.workspace))
            if prefill_mask is not None:
                cached_k, cached_v = (past[i][0], past[i][1]) if past is not None else (None, None)
                parts.append(chunked_attention(q[B:], k[B:], v[B:], cached_k, cached_v, prefill_mask, chunks))
            x = layer.finish(x, torch.cat(parts))
            new_keys.append(k)
            new_values.append(v)
        logits = m.lm_head(m.norm(x if output_rows is None else x[output_rows]))  # [rows sampled, vocab]
        return logits, self._rows(torch.stack(new_keys)), self._rows(torch.stack(new_values))
