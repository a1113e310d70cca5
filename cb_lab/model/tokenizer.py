"""Text to token ids and back: a built-in byte tokenizer, or a ``tokenizer.json`` through ``tokenizers``.

The byte tokenizer needs no file at all: ids 0..255 are the UTF-8 bytes, 256 is BOS and 257 is
EOS, so any text encodes and decodes back exactly (a byte sequence cut mid-character decodes
with U+FFFD, which only happens when a generation stops inside a character).

A tokenizer also turns a chat (``[{"role": "user", "content": "..."}]``) into prompt ids through
the model's chat template (``cb_lab/model/chat.py``), as HF's ``apply_chat_template`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from cb_lab.exceptions import ConfigurationError, ValidationError
from cb_lab.model.chat import FALLBACK_CHAT_TEMPLATE, Message, render_chat
from cb_lab.model.hf_config import read_json_object

__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "default_tokenizer"]


class Tokenizer(Protocol):
    """What the engine needs of a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_token_id(self) -> int | None: ...

    @property
    def eos_token_id(self) -> int | None: ...

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]: ...


def _check_text(text: object) -> str:
    """``text`` as a str that UTF-8 can encode (no lone surrogates, as undecodable input bytes become)."""
    if not isinstance(text, str):
        raise ValidationError(f"encode takes a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValidationError(f"the text has an invalid character {text[e.start]!r} at position {e.start} (not "
                              "valid Unicode, e.g. input bytes that were not UTF-8); pass valid text") from None
    return text


def _check_ids(ids: object, vocab_size: int) -> list[int]:
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValidationError(f"decode takes a list of int token ids, got {ids!r:.60}")
    if any(not 0 <= i < vocab_size for i in ids):
        raise ValidationError(f"token ids lie in [0, {vocab_size}), got {[i for i in ids if not 0 <= i < vocab_size]}")
    return list(ids)


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus BOS (256) and EOS (257)."""

    vocab_size = 258
    bos_token_id = 256
    eos_token_id = 257

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """The UTF-8 bytes of ``text``, after BOS unless ``add_bos=False``."""
        return ([self.bos_token_id] if add_bos is not False else []) + list(_check_text(text).encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """The text of the byte ids; BOS and EOS are dropped."""
        return bytes(i for i in _check_ids(ids, self.vocab_size) if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """BOS, then ``messages`` under ``FALLBACK_CHAT_TEMPLATE`` (a byte model has no template of its own)."""
        return self.encode(render_chat(FALLBACK_CHAT_TEMPLATE, messages, add_generation_prompt=add_generation_prompt))


class HFTokenizer:
    """A ``tokenizer.json`` (Hugging Face ``tokenizers``); BOS/EOS ids come from the model's config.

    A ``tokenizer_config.json`` beside the file, as HF writes it, gives the chat template, whether
    ``encode`` adds BOS (``add_bos_token``, True when absent) and the special tokens' text.
    """

    def __init__(self, path: str | Path, bos_token_id: int | None = None, eos_token_id: int | None = None) -> None:
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError:
            raise ConfigurationError(f"{path} needs the 'tokenizers' package: pip install tokenizers") from None
        self._tok = RustTokenizer.from_file(str(path))
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        config_file = Path(path).with_name("tokenizer_config.json")
        config = read_json_object(config_file) if config_file.is_file() else {}
        self.add_bos_token = bool(config.get("add_bos_token", True))
        self.chat_template: str | None = config.get("chat_template")
        # The special tokens' text, which templates may write (``{{ bos_token }}``).
        self.special_tokens = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """The ids of ``text``, after ``bos_token_id`` if ``add_bos`` (None: ``add_bos_token``)."""
        ids: list[int] = self._tok.encode(_check_text(text), add_special_tokens=False).ids
        add = self.add_bos_token if add_bos is None else add_bos
        return ([self.bos_token_id] if add and self.bos_token_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        text: str = self._tok.decode(_check_ids(ids, self.vocab_size), skip_special_tokens=True)
        return text

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """The prompt ids of a conversation: the model's template (else ``FALLBACK_CHAT_TEMPLATE``) rendered,
        then encoded without an added BOS (the template writes what the model expects), as HF does."""
        text = render_chat(self.chat_template or FALLBACK_CHAT_TEMPLATE, messages,
                           add_generation_prompt=add_generation_prompt, **self.special_tokens)
        return self.encode(text, add_bos=False)


def default_tokenizer(vocab_size: int) -> Tokenizer | None:
    """The tokenizer of a model that comes without one: the byte tokenizer when the vocabulary holds its
    258 ids, else None (the model then takes token ids only)."""
    return ByteTokenizer() if vocab_size >= ByteTokenizer.vocab_size else None
