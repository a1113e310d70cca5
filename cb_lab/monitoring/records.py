"""What the metrics collector records: one :class:`StepMetrics` per step, one
:class:`RequestMetrics` per request (its latencies in steps and in seconds, defined in
``metrics.py``'s docstring).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

__all__ = ["RequestMetrics", "StepMetrics"]

_Num = TypeVar("_Num", int, float)


def _minus(end: _Num | None, start: _Num | None) -> _Num | None:
    return None if end is None or start is None else end - start


@dataclass(slots=True)
class StepMetrics:
    """One scheduler step. ``memory_mb`` is the process RSS, or None when profiling is off."""

    step_id: int
    decode_tokens: int
    prefill_tokens: int
    total_tokens: int
    active_requests: int
    finished_requests: int
    step_duration: float
    status: str
    timestamp: float
    memory_mb: float | None
    waiting_requests: int = 0  # admitted nowhere yet (serving simulation)
    preempted_requests: int = 0  # preempted in this step
    padding_tokens: int = 0  # static batching: batch slots held by finished requests
    kv_blocks_used: int | None = None  # blocks in use in the shared KV pool after the step (None: no shared pool)
    max_tokens_per_step: int | None = None  # the step's token budget, when the stats carry it
    prefix_hit_tokens: int = 0  # prefill rows taken from cached blocks (prefix caching)
    prefix_hit_blocks: int = 0  # ... the cached blocks holding them
    admitted_prompt_tokens: int = 0  # prefill rows of the requests admitted in the step
    admitted_prompt_blocks: int = 0  # ... their full blocks
    kv_evictions: int = 0  # cached blocks evicted to make room
    kv_copies: int = 0  # copy-on-write copies of shared blocks


@dataclass(slots=True)
class RequestMetrics:
    """One tracked request; token counts are absolute (the latest reported), not increments."""

    req_id: str
    total_tokens: int
    start_time: float
    prefill_tokens: int = 0
    decode_tokens: int = 0
    first_token_time: float | None = None
    end_time: float | None = None
    # Steps (the module docstring defines the latencies built from them); None when not reported.
    arrival_step: int | None = None
    first_scheduled_step: int | None = None
    first_token_step: int | None = None
    finish_step: int | None = None
    token_steps: list[int] = field(default_factory=list)  # the step of each generated token
    preemptions: int = 0
    first_scheduled_time: float | None = None

    @property
    def latency(self) -> float | None:
        return None if self.end_time is None else self.end_time - self.start_time

    @property
    def time_to_first_token(self) -> float | None:
        """Set by the first progress update that reports a decode token, not by prefill."""
        return None if self.first_token_time is None else self.first_token_time - self.start_time

    @property
    def is_finished(self) -> bool:
        return self.end_time is not None

    @property
    def queueing_steps(self) -> int | None:
        return _minus(self.first_scheduled_step, self.arrival_step)

    @property
    def ttft_steps(self) -> int | None:
        gap = _minus(self.first_token_step, self.arrival_step)
        return None if gap is None else gap + 1

    @property
    def e2e_steps(self) -> int | None:
        gap = _minus(self.finish_step, self.arrival_step)
        return None if gap is None else gap + 1

    @property
    def tpot_steps(self) -> float | None:
        return self._per_token(_minus(self.finish_step, self.first_token_step))

    @property
    def queueing_s(self) -> float | None:
        return _minus(self.first_scheduled_time, self.start_time)

    @property
    def ttft_s(self) -> float | None:
        return self.time_to_first_token

    @property
    def e2e_s(self) -> float | None:
        return self.latency

    @property
    def tpot_s(self) -> float | None:
        return self._per_token(_minus(self.end_time, self.first_token_time))

    def _per_token(self, span: float | None) -> float | None:
        # n tokens leave n - 1 gaps after the first one.
        return None if span is None or self.decode_tokens < 2 else span / (self.decode_tokens - 1)
