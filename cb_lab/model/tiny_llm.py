"""TinyLLM: one attention layer, one head, and tokens that are plain vectors.

There is no vocabulary: a token is a ``[D]`` vector and the model's output row at a
position *is* the next token (or goes through a sampler first). That keeps every number
small enough to print while the data flow is exactly a decoder's::

    x [T, D] -> RMSNorm -> q, k, v = Wq h, Wk h, Wv h -> attention -> Wo -> out [T, D]

Three ways to run it, all the same math (tests hold them to it):

- ``forward_prefill_dense``: one sequence, causal mask. The *oracle* every schedule must match.
- ``forward_prefill_ragged``: many requests' chunks in one flat batch with a ragged mask,
  optionally on top of their cached prefixes (chunked prefill).
- ``forward_decode``: one new token against a request's KV cache (paged caches are read
  through their block table by paged attention).
- ``forward_fused``: a whole step in ONE forward: decode tokens and prefill chunks of many
  requests share each projection matmul, so the weights are read once per step, not once
  per decode token. Decode rows take paged attention, prefill rows ragged attention.

None of them writes to a cache: they return the new ``k, v`` rows and the caller decides
when to store them (the scheduler does it only after the whole step has been computed).
Shape letters: ``T`` one sequence, ``N`` rows of a ragged batch, ``C`` cached rows, ``D`` dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cb_lab.attention.dense_attention import dense_causal_attention, scaled_dot_product_attention
from cb_lab.attention.paged_attention import PagedKV, paged_attention
from cb_lab.attention.ragged_attention import ragged_attention
from cb_lab.checks import check_int
from cb_lab.core.executor import KV, AttentionHook
from cb_lab.core.kv_cache import BaseKVCache, PagedKVCache
from cb_lab.exceptions import ModelError

__all__ = ["TinyLLM"]


class TinyLLM(nn.Module):
    """A single-layer, single-head attention block with Q/K/V/O projections.

    Weights come from torch's global RNG: call ``torch.manual_seed`` first for a
    reproducible model. ``eps`` guards the RMSNorm of an all-zero token.
    """

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.dim = check_int("TinyLLM dim", dim)
        self.eps = 1e-6
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            # std 1/sqrt(D) keeps rows near unit scale, so generated tokens neither vanish nor blow up.
            nn.init.normal_(proj.weight, std=dim**-0.5)

    @property
    def device(self) -> torch.device:
        return self.q_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q_proj.weight.dtype

    @property
    def token_shape(self) -> tuple[int, ...]:
        """A token is a ``[dim]`` vector."""
        return (self.dim,)

    @property
    def kv_dim(self) -> int:
        """A cached K (or V) row is ``[dim]``: one layer, one head."""
        return self.dim

    def _check_rows(self, x: object, name: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise ModelError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ModelError(f"{name} must be [rows, {self.dim}] for this model, got {tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise ModelError(f"{name} must be {self.dtype} like the model's weights, got {x.dtype}")

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [N, D]`` -> ``q, k, v`` each ``[N, D]``, from the RMS-normalised input."""
        h = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.q_proj(h), self.k_proj(h), self.v_proj(h)

    @torch.no_grad()  # no_grad, not inference_mode: caches are written in place outside it later
    def forward_prefill_dense(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Causal forward of one whole sequence ``[T, D]`` -> ``(out, k, v)``, each ``[T, D]``."""
        self._check_rows(tokens, "tokens")
        q, k, v = self.project_qkv(tokens)
        attn, _ = dense_causal_attention(q, k, v)
        return self.o_proj(attn), k, v

    @torch.no_grad()
    def forward_prefill_ragged(
        self,
        tokens: torch.Tensor,
        ragged_mask: torch.Tensor,
        past_kv: KV | None = None,
        *,
        attention_hooks: Sequence[AttentionHook] = (),
        output_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward of a ragged batch ``tokens [N, D]`` -> ``(out, k, v)`` for its N rows.

        Without ``past_kv`` the mask is ``[N, N]``. With ``past_kv = (K [C, D], V [C, D])``
        (the batch's cached prefixes, concatenated) the keys are ``cat(K, k)`` and the
        mask is ``[N, C + N]``: cached columns first, then the batch's own. ``output_rows``:
        only those rows' outputs (``out [len(output_rows), D]``); ``k, v`` stay ``[N, D]``.
        """
        self._check_rows(tokens, "tokens")
        q, k, v = self.project_qkv(tokens)
        keys, values = k, v
        if past_kv is not None:
            keys = torch.cat([past_kv[0].to(k.dtype), k])
            values = torch.cat([past_kv[1].to(v.dtype), v])
        attn, probs = ragged_attention(q, keys, values, ragged_mask)
        for hook in attention_hooks:
            hook.on_attention("prefill", probs)
        return self.o_proj(attn if output_rows is None else attn[output_rows]), k, v

    @torch.no_grad()
    def forward_decode(
        self,
        new_token: torch.Tensor,
        kv_cache: BaseKVCache,
        *,
        attention_hooks: Sequence[AttentionHook] = (),
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token ``[D]`` or ``[1, D]`` against its request's cache -> ``(out, k, v)``, each ``[1, D]``.

        The token attends to every cached position *and to itself*. The cache is only
        read; store the returned ``k, v`` to advance it.
        """
        x = new_token[None] if isinstance(new_token, torch.Tensor) and new_token.dim() == 1 else new_token
        self._check_rows(x, "new_token")
        if x.shape[0] != 1:
            raise ModelError(f"forward_decode takes one token, got {x.shape[0]} rows")
        q, k, v = self.project_qkv(x)
        if len(kv_cache) == 0:
            attn, probs = scaled_dot_product_attention(q, k, v)  # nothing cached: only itself
        elif isinstance(kv_cache, PagedKVCache) and kv_cache.pool is not None:
            pool = kv_cache.pool
            table = torch.tensor([kv_cache.block_table], device=self.device)  # [1, num_blocks]
            lens = torch.tensor([len(kv_cache)], device=self.device)
            attn, probs = paged_attention(q, pool.key_cache[0], pool.value_cache[0], table, lens, k, v)  # one layer
        else:
            k_cache, v_cache = kv_cache.get_kv()  # [C, D] views
            keys = torch.cat([k_cache.to(k.dtype), k])
            values = torch.cat([v_cache.to(v.dtype), v])
            attn, probs = scaled_dot_product_attention(q, keys, values)
        for hook in attention_hooks:
            hook.on_attention("decode", probs)
        return self.o_proj(attn), k, v

    @torch.no_grad()
    def forward_fused(
        self,
        tokens: torch.Tensor,
        decode_kv: PagedKV | None,
        prefill_mask: torch.Tensor | None,
        prefill_past: KV | None = None,
        *,
        attention_hooks: Sequence[AttentionHook] = (),
        output_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward over a step's flat batch ``tokens [N, D]`` -> ``(out, k, v)``, each ``[N, D]``
        (``out [len(output_rows), D]`` when ``output_rows`` names the rows whose output is needed).

        The first ``B = decode_kv.num_rows`` rows are decode tokens: each attends to its
        request's cached rows (found through ``decode_kv``) and to itself. The other
        ``P = N - B`` rows are prefill chunks: they attend through ``prefill_mask
        [P, C + P]`` to ``prefill_past`` (their cached prefixes, ``[C, D]``) and to each other.
        """
        self._check_rows(tokens, "tokens")
        num_decode = 0 if decode_kv is None else decode_kv.num_rows
        q, k, v = self.project_qkv(tokens)  # [N, D] each: every weight matrix is read once
        parts = []
        if decode_kv is not None:
            d = decode_kv
            attn, probs = paged_attention(  # the pool's layer 0: TinyLLM's only layer
                q[:num_decode], d.key_cache[0], d.value_cache[0], d.block_tables, d.context_lens,
                k[:num_decode], v[:num_decode], d.workspace,
            )
            parts.append(attn)
            for hook in attention_hooks:
                hook.on_attention("decode", probs)
        if prefill_mask is not None:
            keys, values = k[num_decode:], v[num_decode:]
            if prefill_past is not None:
                keys = torch.cat([prefill_past[0].to(k.dtype), keys])
                values = torch.cat([prefill_past[1].to(v.dtype), values])
            attn, probs = ragged_attention(q[num_decode:], keys, values, prefill_mask)
            parts.append(attn)
            for hook in attention_hooks:
                hook.on_attention("prefill", probs)
        if sum(part.shape[0] for part in parts) != tokens.shape[0]:
            raise ModelError(
                f"forward_fused got {tokens.shape[0]} rows but {num_decode} decode rows and a prefill mask for "
                f"{tokens.shape[0] - num_decode if prefill_mask is not None else 0}; every row needs one of them"
            )
        attn = torch.cat(parts)
        return self.o_proj(attn if output_rows is None else attn[output_rows]), k, v
