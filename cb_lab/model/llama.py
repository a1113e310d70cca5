"""A Llama-architecture decoder over real token ids: the next question after TinyLLM.

TinyLLM's tokens are vectors and its one layer has one head. ``LlamaModel`` is what a real LLM
is: a token embedding, ``n_layers`` decoder layers (RMSNorm, attention with RoPE and
grouped-query heads, RMSNorm, a SwiGLU MLP; ``llama_layers.py``), a final RMSNorm and an LM
head (tied to the embedding or not), as HF transformers' ``LlamaForCausalLM`` computes it::

    ids [N] -> embed [N, D] -> n_layers x (attention, MLP) -> norm -> lm_head -> logits [N, vocab]

``forward`` takes a flat batch of rows with explicit positions, a mask and the cached K/V of
every layer, so a step can mix requests exactly as TinyLLM's ragged forward does; its new K/V
come back per layer (``[n_layers, N, n_kv_heads, head_dim]``) for the caller to store.
``forward_dense`` is one sequence, causal: the oracle. Weights are seeded (``seed``) or loaded
from a checkpoint (``cb_lab/model/checkpoint.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from cb_lab.exceptions import ModelError
from cb_lab.model.llama_config import LlamaConfig
from cb_lab.model.llama_layers import DecoderLayer, RMSNorm, grouped_attention, rope_cos_sin

__all__ = ["LayerKV", "LlamaModel"]

LayerKV = tuple[torch.Tensor, torch.Tensor]  # one layer's keys, values: [S, n_kv_heads, head_dim] each


class LlamaModel(nn.Module):
    """A decoder-only transformer in Llama's layout; ``seed`` draws its weights (normal, std 0.02)."""

    def __init__(self, config: LlamaConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        gen = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02, generator=gen)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def _check(self, ids: torch.Tensor, positions: torch.Tensor) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype != torch.long:
            got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ModelError(f"token ids must be a 1-D int64 tensor, got {got}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            low, high = int(ids.min()), int(ids.max())
            raise ModelError(f"token ids must lie in [0, {self.config.vocab_size}), got {low}..{high}")
        if positions.shape != ids.shape or (positions.numel() and int(positions.max()) >= self.config.max_position):
            raise ModelError(
                f"positions must be [{ids.numel()}] and below max_position={self.config.max_position}, "
                f"got shape {tuple(positions.shape)}"
            )

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, past: Sequence[LayerKV] | None = None,
        *, output_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits ``[N, vocab]`` (only ``output_rows``' when given) and the rows' new ``keys, values
        [n_layers, N, G, d]``.

        ``mask [N, C + N]`` (True = may attend) covers ``C`` cached rows (``past[l]``, one
        ``(k, v)`` of ``[C, G, d]`` per layer) and then the batch's own rows. Gradients flow
        (a training loop calls it); ``forward_dense`` and ``LlamaStepModel`` run it under no_grad.
        """
        self._check(ids, positions)
        cos, sin = rope_cos_sin(positions, self.config.head_size, self.config.rope_theta)
        x = self.embed_tokens(ids)  # [N, D]
        new_keys, new_values = [], []
        for i, layer in enumerate(cast(Sequence[DecoderLayer], self.layers)):
            q, k, v = layer.project_kv(x, cos, sin)
            keys, values = (k, v) if past is None else (torch.cat([past[i][0], k]), torch.cat([past[i][1], v]))
            x = layer.finish(x, grouped_attention(q, keys, values, mask))
            new_keys.append(k)
            new_values.append(v)
        x = x if output_rows is None else x[output_rows]
        return self.lm_head(self.norm(x)), torch.stack(new_keys), torch.stack(new_values)

    @torch.no_grad()
    def forward_dense(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[T, vocab]`` of one sequence with a causal mask: the oracle every schedule must match."""
        T = ids.shape[0] if isinstance(ids, torch.Tensor) else 0
        positions = torch.arange(T, device=self.device)
        mask = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
        return self.forward(ids, positions, mask)[0]
