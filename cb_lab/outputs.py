"""What ``LLMEngine`` returns, shaped like vLLM's ``RequestOutput``.

One ``RequestOutput`` per request (per prompt), holding one ``CompletionOutput`` per sample
(``SamplingParams.n``)::

    RequestOutput(request_id, prompt, prompt_token_ids, prompt_logprobs, outputs=[...], finished)
        CompletionOutput(index=0, text, token_ids, cumulative_logprob, logprobs, finish_reason, stop_reason)
        CompletionOutput(index=1, ...)

``logprobs`` is one ``{token_id: Logprob}`` dict per generated token: the token itself first,
then the ``SamplingParams.logprobs`` most likely ids; ``prompt_logprobs`` the same per prompt
token (None for the first, which nothing predicts). ``out.text``, ``out.token_ids`` and
``out.finish_reason`` are the first sample's, for the common ``n=1`` case.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CompletionOutput", "Logprob", "PromptLogprobs", "RequestOutput", "SampleLogprobs"]


@dataclass(slots=True)
class Logprob:
    """One id's log-probability, its rank in its row (1: the most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


SampleLogprobs = list[dict[int, Logprob]]  # per generated token
PromptLogprobs = list[dict[int, Logprob] | None]  # per prompt token; None for the first


@dataclass(slots=True)
class CompletionOutput:
    """One sample of a request so far. ``cumulative_logprob`` and ``logprobs`` are None unless
    ``SamplingParams.logprobs`` asks for them. ``finish_reason``: "length", "stop" or "abort";
    ``stop_reason``: the stop string or stop id that ended it (None for the EOS or the length)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """One request's result so far: its samples in ``outputs``; ``finished`` once every one is."""

    request_id: str
    prompt: str | list[int]
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None = None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    arrival_time: float = 0.0  # time.perf_counter() when it was added
    token_times: list[float] = field(default_factory=list)  # outputs[0]'s tokens: seconds after arrival

    @property
    def ttft_s(self) -> float | None:
        """Time to the first token, in seconds."""
        return self.token_times[0] if self.token_times else None

    @property
    def text(self) -> str:
        """The first sample's text (``outputs[0].text``)."""
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        """The first sample's token ids (``outputs[0].token_ids``)."""
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        """The first sample's finish reason (``outputs[0].finish_reason``)."""
        return self.outputs[0].finish_reason
