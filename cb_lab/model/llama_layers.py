"""The parts of a Llama decoder layer: RMSNorm, RoPE, grouped-query attention, a SwiGLU MLP.

One layer, in reading order (``N`` rows of a flat batch, ``S`` keys they may see, ``H`` query
heads, ``G`` key/value heads, ``d`` the head width)::

    h = x + attention(rmsnorm(x))        q [N, H, d], k/v [S, G, d]: each k/v head serves H/G query heads
    out = h + mlp(rmsnorm(h))             down(silu(gate(h)) * up(h))

RoPE rotates q and k by their token's position in its own request, so the same token at the
same position gets the same rotation whatever batch it runs in. Every piece follows HF
transformers' ``LlamaForCausalLM`` numerically (norms and rotations in float32).
"""

from __future__ import annotations

import torch
from torch import nn

from cb_lab.model.llama_config import LlamaConfig

__all__ = ["DecoderLayer", "RMSNorm", "SwiGLU", "apply_rope", "grouped_attention", "rope_cos_sin"]


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``[N, head_dim]`` for integer ``positions [N]``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [N, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [N, d]: the first and second half rotate together
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [N, heads, d]`` by its rows' positions: ``x * cos + rotate_half(x) * sin``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``q [N, H, d]`` over ``k, v [S, G, d]`` with ``mask [N, S]`` (True = may attend) -> ``[N, H, d]``.

    Query head ``h`` reads key/value head ``h // (H / G)`` (HF's ``repeat_kv``); torch's
    ``scaled_dot_product_attention`` does it without copying the heads (``enable_gqa``).
    """
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask[None, None],
        enable_gqa=True,
    )  # [1, H, N, d]
    return out[0].transpose(0, 1)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


class DecoderLayer(nn.Module):
    """RMSNorm, attention with RoPE and grouped-query heads, RMSNorm, SwiGLU; both with a residual."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        H, G, d = config.n_heads, config.n_kv_heads, config.head_size
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.q_proj = nn.Linear(config.dim, H * d, bias=False)
        self.k_proj = nn.Linear(config.dim, G * d, bias=False)
        self.v_proj = nn.Linear(config.dim, G * d, bias=False)
        self.o_proj = nn.Linear(H * d, config.dim, bias=False)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = SwiGLU(config.dim, config.ffn_dim)
        self.shape = (H, G, d)

    def project_kv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q [N, H, d]`` and the rows' own ``k, v [N, G, d]`` (q and k rotated)."""
        H, G, d = self.shape
        h = self.input_layernorm(x)
        q = apply_rope(self.q_proj(h).view(-1, H, d), cos, sin)
        k = apply_rope(self.k_proj(h).view(-1, G, d), cos, sin)
        return q, k, self.v_proj(h).view(-1, G, d)

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The residual stream after this layer, from its input ``x [N, D]`` and ``attn [N, H, d]``."""
        h: torch.Tensor = x + self.o_proj(attn.reshape(x.shape[0], -1))
        out: torch.Tensor = h + self.mlp(self.post_attention_layernorm(h))
        return out
