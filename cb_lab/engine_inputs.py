"""What ``LLMEngine`` accepts, checked once at its door: prompts, sampling params, token ids.

A prompt is text (``str``) or a list of int token ids; ``generate`` takes one prompt or a list
of them, and one ``SamplingParams`` for all or one each. Anything else (a dict of chat messages,
bytes, a tensor, floats or bools as ids, ids outside the vocabulary) is a ``ValidationError``
that names it and says what to give instead, raised before any request is queued.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cb_lab.exceptions import ValidationError
from cb_lab.sampling import SamplingParams

__all__ = ["Prompt", "as_params", "as_prompt", "as_prompts", "check_ids"]

Prompt = str | Sequence[int]


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r:.60}"


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_ids(value: Any) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))
            and all(_is_id(i) for i in value))


def as_prompts(prompts: Any) -> list[Prompt]:
    """One prompt or a list of prompts, as a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    if _is_ids(prompts) and prompts:  # one prompt of token ids
        return [list(prompts)]
    if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)):
        raise ValidationError(f"prompts must be text, a list of int token ids, or a list of those; "
                              f"got {_show(prompts)}")
    return [as_prompt(p, f"prompt {i}") for i, p in enumerate(prompts)]


def as_prompt(prompt: Any, what: str = "the prompt") -> Prompt:
    """One prompt: text, or a list of int token ids (as a new list)."""
    if isinstance(prompt, Mapping):
        raise ValidationError(f"{what} is a dict ({prompt!r:.60}); chat messages go to LLMEngine.chat")
    if not (isinstance(prompt, str) or _is_ids(prompt)):
        raise ValidationError(f"{what} must be text or a list of int token ids, got {_show(prompt)}")
    return prompt if isinstance(prompt, str) else list(prompt)


def as_params(params: Any, count: int) -> list[SamplingParams]:
    """``None`` (the defaults), one ``SamplingParams`` for every prompt, or a list of one each."""
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * count
    if not isinstance(params, Sequence) or isinstance(params, (str, bytes)):
        raise ValidationError(f"sampling_params must be a SamplingParams, a list of them or None, got {_show(params)}")
    if len(params) != count:
        raise ValidationError(f"{len(params)} sampling params for {count} prompts; give one or one each")
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise ValidationError(f"sampling_params[{i}] must be a SamplingParams, got {_show(p)}")
    return list(params)


def check_ids(ids: Sequence[int], vocab_size: int, what: str) -> None:
    """Every id of ``what`` lies in ``[0, vocab_size)``."""
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValidationError(f"{what}: token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})")
