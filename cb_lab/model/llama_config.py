"""The shape of a Llama-architecture decoder: one frozen dataclass, checked once.

The field names are cb-lab's; ``cb_lab/model/checkpoint.py`` maps them to and from the keys
of a Hugging Face ``config.json`` (``hidden_size`` is ``dim``, ``num_key_value_heads`` is
``n_kv_heads``, ...). The defaults make a small model over the byte tokenizer's vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

from cb_lab.checks import check_int
from cb_lab.exceptions import ConfigurationError

__all__ = ["LlamaConfig"]


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    """Sizes of the decoder. ``head_dim`` defaults to ``dim // n_heads``; give it to decouple them."""

    vocab_size: int = 258  # the byte tokenizer: 256 bytes, BOS, EOS
    dim: int = 64  # the residual stream (hidden_size)
    n_layers: int = 2
    n_heads: int = 4  # query heads
    n_kv_heads: int = 2  # key/value heads; n_heads / n_kv_heads query heads share each (grouped-query attention)
    ffn_dim: int = 128  # the SwiGLU MLP's inner size (intermediate_size)
    rope_theta: float = 10_000.0  # RoPE base: rotation frequencies theta ** (-2i / head_dim)
    norm_eps: float = 1e-5  # RMSNorm's epsilon
    max_position: int = 2048  # positions past this are refused
    tie_embeddings: bool = True  # the LM head reuses the token embedding matrix
    head_dim: int | None = None
    # Ids that end a generation (config.json's and generation_config.json's eos_token_id: Llama 3 lists
    # several); LLMEngine stops at these and at its tokenizer's EOS.
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_position"):
            check_int(f"LlamaConfig {name}", getattr(self, name))
        if self.n_heads % self.n_kv_heads:
            raise ConfigurationError(
                f"LlamaConfig n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} "
                "(each key/value head serves the same number of query heads)"
            )
        if self.head_dim is None and self.dim % self.n_heads:
            raise ConfigurationError(f"dim={self.dim} is not a multiple of n_heads={self.n_heads}; give head_dim")
        if self.head_dim is not None:
            check_int("LlamaConfig head_dim", self.head_dim)
        if self.head_size % 2:
            raise ConfigurationError(f"head_dim must be even for RoPE (pairs of dims rotate), got {self.head_size}")
        if not (self.rope_theta > 0 and self.norm_eps > 0):
            raise ConfigurationError(f"rope_theta and norm_eps must be > 0, got {self.rope_theta}, {self.norm_eps}")
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigurationError(f"tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        eos = self.eos_token_ids
        if not isinstance(eos, tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size for i in eos):
            raise ConfigurationError(f"LlamaConfig eos_token_ids must be a tuple of ids in [0, {self.vocab_size}), "
                                     f"got {eos!r:.60}")

    @property
    def head_size(self) -> int:
        """The per-head width actually used: ``head_dim`` or ``dim // n_heads``."""
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads
