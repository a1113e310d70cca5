"""Text to token ids and back: a built-in byte tokenizer, or a ``tokenizer.json`` through ``tokenizers``.

The byte tokenizer needs no file at all: ids 0..255 are the UTF-8 bytes, 256 is BOS and 257 is
EOS, so any text encodes and decodes back exactly (a byte sequence cut mid-character decodes
with U+FFFD, which only happens when a generation stops inside a character).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from cb_lab.exceptions import ConfigurationError, ValidationError

__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer"]


class Tokenizer(Protocol):
    """What the engine needs of a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_token_id(self) -> int | None: ...

    @property
    def eos_token_id(self) -> int | None: ...

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus BOS (256) and EOS (257)."""

    vocab_size = 258
    bos_token_id = 256
    eos_token_id = 257

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValidationError(f"encode takes a str, got {type(text).__name__}")
        return ([self.bos_token_id] if add_bos else []) + list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """The text of the byte ids; BOS and EOS are dropped."""
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValidationError(f"byte tokenizer ids lie in [0, {self.vocab_size}), got {ids}")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` (Hugging Face ``tokenizers``); BOS/EOS ids come from the model's config."""

    def __init__(self, path: str | Path, bos_token_id: int | None = None, eos_token_id: int | None = None) -> None:
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError:
            raise ConfigurationError(f"{path} needs the 'tokenizers' package: pip install tokenizers") from None
        self._tok = RustTokenizer.from_file(str(path))
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValidationError(f"encode takes a str, got {type(text).__name__}")
        ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_token_id] if add_bos and self.bos_token_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        text: str = self._tok.decode(ids, skip_special_tokens=True)
        return text
