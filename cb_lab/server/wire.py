"""Engine outputs as OpenAI response bodies: whole answers, and the deltas a stream sends.

A ``RequestOutput`` is cumulative (the text so far); a streamed chunk carries only what is new
since the last one. ``new_delta`` cuts that piece for one choice, and the ``*_chunk`` /
``*_response`` functions dress deltas or finished outputs in the two endpoints' shapes.
Choice ``index`` runs over prompts, then samples: prompt ``i``'s sample ``j`` is ``i * n + j``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cb_lab.model.tokenizer import Tokenizer
from cb_lab.outputs import CompletionOutput, Logprob, RequestOutput, SampleLogprobs

__all__ = ["Delta", "chat_chunk", "chat_response", "completion_chunk", "completion_response", "new_delta", "usage"]


@dataclass(frozen=True, slots=True)
class Delta:
    """What one choice gained since its last chunk; ``chars``/``tokens``: where the next one starts."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: SampleLogprobs | None
    finish_reason: str | None
    stop_reason: str | int | None
    first: bool
    chars: int
    tokens: int


def new_delta(index: int, c: CompletionOutput, sent: dict[int, Delta]) -> Delta | None:
    """Choice ``index``'s delta, or None when it has nothing new (bytes of a character held back,
    or it finished already); records it in ``sent``."""
    last = sent.get(index)
    if last is not None and last.finish_reason is not None:
        return None
    chars, tokens = (last.chars, last.tokens) if last else (0, 0)
    if len(c.text) == chars and c.finish_reason is None:
        return None
    delta = Delta(index, c.text[chars:], c.token_ids[tokens:], c.logprobs[tokens:] if c.logprobs else None,
                  c.finish_reason, c.stop_reason, first=last is None, chars=len(c.text), tokens=len(c.token_ids))
    sent[index] = delta
    return delta


def usage(outputs: Sequence[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(out.prompt_token_ids) for out in outputs)
    completion = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _token(tokenizer: Tokenizer | None, token_id: int, logprob: Logprob | None = None) -> str:
    """A token's text (a model without a tokenizer shows ``<id>``)."""
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return tokenizer.decode([token_id]) if tokenizer is not None else f"<{token_id}>"


def _best(top: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The ``k`` most likely ids of a token's dict (which also holds the chosen id, whatever its rank)."""
    return sorted(top.items(), key=lambda item: item[1].rank or 0)[:k]


def _completion_logprobs(token_ids: Sequence[int], logprobs: SampleLogprobs | None, tokenizer: Tokenizer | None,
                         k: int) -> dict[str, Any] | None:
    """The legacy completions shape: parallel lists over the tokens (``text_offset`` into the chunk)."""
    if logprobs is None:
        return None
    tokens = [_token(tokenizer, t, top.get(t)) for t, top in zip(token_ids, logprobs)]
    offsets = [sum(len(s) for s in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [top[t].logprob for t, top in zip(token_ids, logprobs)],
            "top_logprobs": [{_token(tokenizer, i, lp): lp.logprob for i, lp in _best(top, k)} for top in logprobs],
            "text_offset": offsets}


def _chat_logprobs(token_ids: Sequence[int], logprobs: SampleLogprobs | None, tokenizer: Tokenizer | None,
                   k: int) -> dict[str, Any] | None:
    """The chat shape: one entry per token, with its ``k`` best alternatives."""
    if logprobs is None:
        return None

    def entry(token_id: int, logprob: Logprob) -> dict[str, Any]:
        text = _token(tokenizer, token_id, logprob)
        return {"token": text, "logprob": logprob.logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(t, top[t]), "top_logprobs": [entry(i, lp) for i, lp in _best(top, k)]}
                        for t, top in zip(token_ids, logprobs)]}


def completion_chunk(meta: dict[str, Any], deltas: Sequence[Delta], tokenizer: Tokenizer | None,
                     k: int) -> dict[str, Any]:
    return {**meta, "object": "text_completion", "choices": [
        {"index": d.index, "text": d.text, "logprobs": _completion_logprobs(d.token_ids, d.logprobs, tokenizer, k),
         "finish_reason": d.finish_reason, "stop_reason": d.stop_reason} for d in deltas]}


def chat_chunk(meta: dict[str, Any], deltas: Sequence[Delta], tokenizer: Tokenizer | None, k: int) -> dict[str, Any]:
    def delta(d: Delta) -> dict[str, str]:
        return {"role": "assistant", "content": d.text} if d.first else {"content": d.text}

    return {**meta, "object": "chat.completion.chunk", "choices": [
        {"index": d.index, "delta": delta(d), "logprobs": _chat_logprobs(d.token_ids, d.logprobs, tokenizer, k),
         "finish_reason": d.finish_reason, "stop_reason": d.stop_reason} for d in deltas]}


def completion_response(meta: dict[str, Any], outputs: Sequence[RequestOutput], n: int, tokenizer: Tokenizer | None,
                        k: int) -> dict[str, Any]:
    choices = [{"index": i * n + c.index, "text": c.text,
                "logprobs": _completion_logprobs(c.token_ids, c.logprobs, tokenizer, k),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
               for i, out in enumerate(outputs) for c in out.outputs]
    return {**meta, "object": "text_completion", "choices": choices, "usage": usage(outputs)}


def chat_response(meta: dict[str, Any], outputs: Sequence[RequestOutput], tokenizer: Tokenizer | None,
                  k: int) -> dict[str, Any]:
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": _chat_logprobs(c.token_ids, c.logprobs, tokenizer, k),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
               for out in outputs for c in out.outputs]
    return {**meta, "object": "chat.completion", "choices": choices, "usage": usage(outputs)}
