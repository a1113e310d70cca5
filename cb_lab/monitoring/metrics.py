"""Count what the scheduler does, step by step and request by request.

Continuous batching is judged by two kinds of numbers:

- **Throughput** (per step): how many tokens each ``Scheduler.step()`` processed,
  split into *prefill* tokens (prompt tokens, computed in bulk) and *decode* tokens
  (one new token per running request). ``tokens_per_second`` is total tokens over
  total step time, so idle steps lower it, as they should.
- **Latency** (per request): *time to first token* (TTFT, dominated by waiting and
  prefill) and *end-to-end latency*. Averages hide the slow tail, so the summary
  also reports p50 and p99, computed with ``statistics.quantiles(n=100,
  method="inclusive")`` (the method is named in the summary, because different
  tools interpolate percentiles differently).

Times come from ``time.perf_counter()`` (monotonic, high resolution; wall-clock time
can jump). Speed is only comparable as a ratio measured in one run on one machine:
:class:`PerformanceBenchmark` times callables side by side for exactly that.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cb_lab.exceptions import ConfigurationError, ValidationError
from cb_lab.monitoring.memory_profiler import Reader, make_memory_reader

__all__ = ["MetricsCollector", "PerformanceBenchmark", "RequestMetrics", "StepMetrics"]

logger = logging.getLogger(__name__)

STEP_STATUSES = ("completed", "no_active_requests")
PERCENTILE_METHOD = "statistics.quantiles(n=100, method='inclusive')"


def _check_int(name: str, value: object, minimum: int = 0, error: type[Exception] = ValidationError) -> int:
    """``value`` if it is an int >= ``minimum`` (a bool is not accepted), else raise ``error``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise error(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_duration(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValidationError(f"step_duration must be a finite float >= 0 (seconds), got {value!r}")
    return float(value)


def _percentile(data: list[float], percent: int) -> float:
    """The ``percent``-th percentile; with a single point, that point (quantiles needs two)."""
    if len(data) == 1:
        return data[0]
    return statistics.quantiles(data, n=100, method="inclusive")[percent - 1]


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


class MetricsCollector:
    """Collects :class:`StepMetrics` and :class:`RequestMetrics` and summarises them.

    ``clock`` and ``read_rss_mb`` (keyword-only) are injectable so tests get exact numbers.
    """

    def __init__(self, enable_memory_profiling: bool = True, *, clock: Callable[[], float] = time.perf_counter,
                 read_rss_mb: Reader | None = None) -> None:
        self.enable_memory_profiling = enable_memory_profiling
        self._clock = clock
        self._read_rss_mb = (read_rss_mb or make_memory_reader()) if enable_memory_profiling else None
        self.steps: list[StepMetrics] = []
        self.requests: dict[str, RequestMetrics] = {}

    def record_step(
        self, step_id: int, decode_tokens: int, prefill_tokens: int, active_requests: int, finished_requests: int,
        step_duration: float, status: str = "completed", total_tokens: int | None = None,
        waiting_requests: int = 0, preempted_requests: int = 0, padding_tokens: int = 0,
    ) -> StepMetrics:
        """Validate and store one step; accepts ``**stats`` from ``Scheduler.step()`` as is.

        ``timestamp`` is when the step is *recorded*; ``step_duration`` is what the scheduler measured.
        """
        counts = {"step_id": step_id, "decode_tokens": decode_tokens, "prefill_tokens": prefill_tokens,
                  "active_requests": active_requests, "finished_requests": finished_requests,
                  "waiting_requests": waiting_requests, "preempted_requests": preempted_requests,
                  "padding_tokens": padding_tokens}
        for name, value in counts.items():
            _check_int(name, value)
        duration = _check_duration(step_duration)
        if status not in STEP_STATUSES:
            raise ValidationError(f"status must be one of {STEP_STATUSES}, got {status!r}")
        expected = decode_tokens + prefill_tokens
        if total_tokens is not None and _check_int("total_tokens", total_tokens) != expected:
            raise ValidationError(
                f"total_tokens ({total_tokens}) must equal decode_tokens + prefill_tokens "
                f"({decode_tokens} + {prefill_tokens} = {expected})"
            )
        memory_mb = self._read_rss_mb() if self._read_rss_mb is not None else None
        step = StepMetrics(
            step_id, decode_tokens, prefill_tokens, expected, active_requests,
            finished_requests, duration, status, self._clock(), memory_mb,
            waiting_requests, preempted_requests, padding_tokens,
        )
        self.steps.append(step)
        logger.debug("step %d: %d tokens in %.6f s (%s)", step_id, expected, duration, status)
        return step

    def get_step_summary(self) -> dict[str, Any]:
        """Totals and averages over all steps, idle ones included; zeros (None memory) when there are none."""
        n = len(self.steps)
        decode = sum(s.decode_tokens for s in self.steps)
        prefill = sum(s.prefill_tokens for s in self.steps)
        total_time = math.fsum(s.step_duration for s in self.steps)
        memory = [s.memory_mb for s in self.steps if s.memory_mb is not None]
        return {
            "total_steps": n,
            "idle_steps": sum(s.status == "no_active_requests" for s in self.steps),
            "total_tokens_processed": decode + prefill,
            "total_decode_tokens": decode,
            "total_prefill_tokens": prefill,
            "total_time": total_time,
            "avg_step_duration": total_time / n if n else 0.0,
            "tokens_per_second": (decode + prefill) / total_time if total_time > 0 else 0.0,
            "avg_tokens_per_step": (decode + prefill) / n if n else 0.0,
            "peak_memory_mb": max(memory) if memory else None,
            "total_preemptions": sum(s.preempted_requests for s in self.steps),
            "total_padding_tokens": sum(s.padding_tokens for s in self.steps),
        }

    def start_request_tracking(self, req_id: str, total_tokens: int) -> None:
        if req_id in self.requests:
            raise ValidationError(f"request {req_id!r} is already tracked; request ids must be unique")
        _check_int("total_tokens", total_tokens)
        self.requests[req_id] = RequestMetrics(req_id, total_tokens, self._clock())

    def _get_open(self, req_id: str) -> RequestMetrics:
        if req_id not in self.requests:
            raise ValidationError(
                f"unknown request id {req_id!r}: call start_request_tracking({req_id!r}, total_tokens) first"
            )
        request = self.requests[req_id]
        if request.is_finished:
            raise ValidationError(f"request {req_id!r} is already finished")
        return request

    def update_request_progress(
        self, req_id: str, prefill_tokens: int | None = None, decode_tokens: int | None = None
    ) -> None:
        """Set absolute token counts; the first update with a decode token stamps TTFT."""
        request = self._get_open(req_id)
        if prefill_tokens is not None:
            request.prefill_tokens = _check_int("prefill_tokens", prefill_tokens)
        if decode_tokens is not None:
            request.decode_tokens = _check_int("decode_tokens", decode_tokens)
            if decode_tokens >= 1 and request.first_token_time is None:
                request.first_token_time = self._clock()

    def finish_request(self, req_id: str) -> RequestMetrics:
        request = self._get_open(req_id)
        request.end_time = self._clock()
        return request

    def get_request_summary(self) -> dict[str, Any]:
        """Counts, mean/p50/p99 latency and mean TTFT over completed requests (None if none)."""
        done = [r for r in self.requests.values() if r.is_finished]
        latencies = [r.latency for r in done if r.latency is not None]
        ttfts = [r.time_to_first_token for r in done if r.time_to_first_token is not None]
        return {
            "total_requests": len(self.requests),
            "completed_requests": len(done),
            "in_flight_requests": len(self.requests) - len(done),
            "mean_latency_s": statistics.fmean(latencies) if latencies else None,
            "p50_latency_s": _percentile(latencies, 50) if latencies else None,
            "p99_latency_s": _percentile(latencies, 99) if latencies else None,
            "mean_ttft_s": statistics.fmean(ttfts) if ttfts else None,
            "percentile_method": PERCENTILE_METHOD,
        }

    def reset(self) -> None:
        self.steps.clear()
        self.requests.clear()


class PerformanceBenchmark:
    """Times callables side by side so results are compared as ratios measured in one run.

    Absolute seconds depend on the machine and its load; the ratio of two medians
    measured side by side, in one process, is what carries over to another machine.
    """

    def __init__(self, warmup: int = 1, repeats: int = 5, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.warmup = _check_int("warmup", warmup, 0, ConfigurationError)
        self.repeats = _check_int("repeats", repeats, 1, ConfigurationError)
        self._clock = clock
        self._results: dict[str, dict[str, float]] = {}

    def measure(self, name: str, fn: Callable[[], object]) -> dict[str, float]:
        """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed one by one."""
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            start = self._clock()
            fn()
            times.append(self._clock() - start)
        result = {"best_s": min(times), "median_s": statistics.median(times),
                  "mean_s": statistics.fmean(times), "repeats": float(self.repeats)}
        self._results[name] = result
        return dict(result)

    def compare(self, baseline: str, candidate: str) -> float:
        """Speedup of ``candidate``: baseline median / candidate median (> 1 means faster)."""
        for name in (baseline, candidate):
            if name not in self._results:
                raise ValidationError(f"no measurement named {name!r}: call measure({name!r}, fn) first")
        candidate_median = self._results[candidate]["median_s"]
        if candidate_median <= 0:
            raise ValidationError(f"median of {candidate!r} is {candidate_median} s; time more work per call")
        return self._results[baseline]["median_s"] / candidate_median

    @property
    def results(self) -> dict[str, dict[str, float]]:
        """A copy of every measurement so far, by name."""
        return {name: dict(result) for name, result in self._results.items()}
