"""The OpenAI wire format: request bodies (pydantic models), their ``SamplingParams``, error bodies.

Only the fields cb-lab can honour are accepted; any other field is a 400 that names it (a typo
such as ``max_token`` is not silently ignored). vLLM's extras ``top_k``, ``min_tokens``,
``repetition_penalty``, ``ignore_eos`` and ``stop_token_ids`` are accepted too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cb_lab.model.chat import Message
from cb_lab.sampling import SamplingParams

__all__ = ["ChatCompletionRequest", "CompletionRequest", "StreamOptions", "error_body"]

# OpenAI's default, which its clients assume when they leave ``max_tokens`` out.
DEFAULT_MAX_TOKENS = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False  # one last chunk with the token counts, before [DONE]


class _Common(BaseModel):
    """The sampling fields both endpoints share (OpenAI's names and defaults)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, gt=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as vLLM does

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k, n=self.n, seed=self.seed, stop=stop,
            stop_token_ids=tuple(self.stop_token_ids), ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logprobs=logprobs)


class CompletionRequest(_Common):
    """``POST /v1/completions``: one prompt (text or token ids) or a list of them."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)  # the top-k alternatives per token
    echo: Literal[False] = False

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(i, int) for i in p):
            return [p]  # type: ignore[list-item]  # one prompt of token ids
        return list(p)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None  # accepted, not shown to the template (as most chat templates do)


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``: a conversation; the answer goes through the chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def conversation(self) -> list[Message]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


def error_body(message: str, *, param: str | None = None, kind: str = "invalid_request_error",
               code: int | None = None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
