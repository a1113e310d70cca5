"""Count what the scheduler does, step by step and request by request.

Continuous batching is judged by two kinds of numbers:

- **Throughput** (per step): how many tokens each ``Scheduler.step()`` processed,
  split into *prefill* tokens (prompt tokens, computed in bulk) and *decode* tokens
  (one new token per running request). ``tokens_per_second`` is total tokens over
  total step time, so idle steps (recorded with status ``no_active_requests``) lower
  it, as they should. ``Scheduler.step()`` with nothing active calls no hook, so
  ``MetricsPlugin`` records only steps that ran; record idle ones by hand if you poll.
- **Latency** (per request): *time to first token* (TTFT, dominated by waiting and
  prefill) and *end-to-end latency*. Averages hide the slow tail, so the summary
  also reports p50 and p99, computed with ``statistics.quantiles(n=100,
  method="inclusive")`` (the method is named in the summary, because different
  tools interpolate percentiles differently).

**Latency in steps.** Seconds depend on the machine; steps do not. A request that arrives
at step ``a`` (it was added while ``scheduler.step_id == a``), is first scheduled (runs a
prefill chunk or a decode) in step ``q``, gets its first token in step ``f``, its ``n``-th
and last in step ``e``, and finishes in step ``e``, has::

    queueing_steps = q - a                  # steps it waited before running a single token
    ttft_steps     = f - a + 1              # arrives at s, first token in s: TTFT 1 (one step)
    e2e_steps      = e - a + 1              # steps from arrival to its last token, both counted
    tpot_steps     = (e - f) / (n - 1)      # time per output token after the first (n >= 2, else None)

The same four in seconds (``queueing_s``, ``ttft_s``, ``e2e_s``, ``tpot_s``) use the times the
collector's clock gave at those events (arrival: ``start_request_tracking``; first scheduled:
``record_request_scheduled``; tokens: ``update_request_progress``; finish: ``finish_request``).

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
from dataclasses import MISSING, fields
from typing import Any, cast

from cb_lab.checks import check_int
from cb_lab.core.view_registry import render
from cb_lab.exceptions import ValidationError
from cb_lab.monitoring.memory_profiler import Reader, make_memory_reader
from cb_lab.monitoring.records import RequestMetrics, StepMetrics

__all__ = ["MetricsCollector", "PerformanceBenchmark", "RequestMetrics", "StepMetrics"]

logger = logging.getLogger(__name__)

STEP_STATUSES = ("completed", "no_active_requests")
PERCENTILE_METHOD = "statistics.quantiles(n=100, method='inclusive')"


def _check_duration(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValidationError(f"step_duration must be a finite float >= 0 (seconds), got {value!r}")
    return float(value)


def _percentile(data: list[float], percent: int) -> float:
    """The ``percent``-th percentile; with a single point, that point (quantiles needs two)."""
    if len(data) == 1:
        return data[0]
    return statistics.quantiles(data, n=100, method="inclusive")[percent - 1]


def _ratio_or_none(a: int, b: int) -> float | None:
    return a / b if b else None


def _distribution(name: str, unit: str, data: list[float]) -> dict[str, float | None]:
    """``{name}_{mean,p50,p90,p99}_{unit}``; every value None when ``data`` is empty."""
    keys = [f"{name}_{stat}_{unit}" for stat in ("mean", "p50", "p90", "p99")]
    if not data:
        return dict.fromkeys(keys)
    return dict(zip(keys, [statistics.fmean(data), *(_percentile(data, p) for p in (50, 90, 99))]))


# StepMetrics' counts with defaults, by name -> the default (None: optional, ``kv_blocks_used`` of a run
# without a shared pool); record_step takes them as keywords.
_OPTIONAL_COUNTS: dict[str, int | None] = {
    f.name: f.default for f in fields(StepMetrics) if f.default is not MISSING
}

# The per-request latencies the summaries report, each in steps and in seconds.
LATENCIES = ("queueing", "ttft", "tpot", "e2e")


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
        step_duration: float, status: str = "completed", total_tokens: int | None = None, **counts: int | None,
    ) -> StepMetrics:
        """Validate and store one step; takes ``**stats`` from ``Scheduler.step()`` as is.

        ``counts`` are :class:`StepMetrics`' optional counts by name (``waiting_requests``,
        ``kv_copies``, ...): the collector stores whatever the stats carry, so a new figure is named
        once, in ``StepMetrics``. ``timestamp`` is when the step is *recorded*; ``step_duration`` is
        what the scheduler measured.
        """
        unknown = sorted(counts.keys() - _OPTIONAL_COUNTS.keys())
        if unknown:
            raise ValidationError(f"record_step got unknown counts {unknown}; it takes {sorted(_OPTIONAL_COUNTS)} "
                                  "(the timestamp and memory_mb are the collector's own)")
        given = {"step_id": step_id, "decode_tokens": decode_tokens, "prefill_tokens": prefill_tokens,
                 "active_requests": active_requests, "finished_requests": finished_requests, **counts}
        for name, value in given.items():
            may_be_none = name in _OPTIONAL_COUNTS and _OPTIONAL_COUNTS[name] is None  # e.g. kv_blocks_used: no pool
            if value is not None or not may_be_none:
                check_int(name, value, 1 if name == "max_tokens_per_step" else 0, ValidationError)  # a budget >= 1
        duration = _check_duration(step_duration)
        if status not in STEP_STATUSES:
            raise ValidationError(f"status must be one of {STEP_STATUSES}, got {status!r}")
        expected = decode_tokens + prefill_tokens
        if status == "no_active_requests" and expected:
            raise ValidationError(f"an idle step (status 'no_active_requests') runs no token, got {expected}")
        if total_tokens is not None and check_int("total_tokens", total_tokens, 0, ValidationError) != expected:
            raise ValidationError(
                f"total_tokens ({total_tokens}) must equal decode_tokens + prefill_tokens "
                f"({decode_tokens} + {prefill_tokens} = {expected})"
            )
        memory_mb = self._read_rss_mb() if self._read_rss_mb is not None else None
        step = StepMetrics(step_id, decode_tokens, prefill_tokens, expected, active_requests, finished_requests,
                           duration, status, self._clock(), memory_mb, **cast(dict[str, Any], counts))
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

    def start_request_tracking(self, req_id: str, total_tokens: int = 0, *, step: int | None = None) -> None:
        """Start the request's clock; ``step``: the step it arrives at (added while ``step_id == step``).

        ``total_tokens`` is what the request is expected to take (prompt + new tokens); 0 when unknown.
        """
        if req_id in self.requests:
            raise ValidationError(f"request {req_id!r} is already tracked; request ids must be unique")
        check_int("total_tokens", total_tokens, 0, ValidationError)
        if step is not None:
            check_int("step", step, 0, ValidationError)
        self.requests[req_id] = RequestMetrics(req_id, total_tokens, self._clock(), arrival_step=step)

    def _get_open(self, req_id: str, step: int | None = None) -> RequestMetrics:
        if req_id not in self.requests:
            raise ValidationError(
                f"unknown request id {req_id!r}: call start_request_tracking({req_id!r}) first"
            )
        request = self.requests[req_id]
        if request.is_finished:
            raise ValidationError(f"request {req_id!r} is already finished")
        if step is not None and check_int("step", step, 0, ValidationError) < (request.arrival_step or 0):
            raise ValidationError(f"request {req_id!r} arrived at step {request.arrival_step}; step {step} is earlier")
        return request

    def record_request_scheduled(self, req_id: str, step: int) -> None:
        """The request runs a token (prefill chunk or decode) in ``step``; only the first call counts."""
        request = self._get_open(req_id, check_int("step", step, 0, ValidationError))
        if request.first_scheduled_step is None:
            request.first_scheduled_step = step
            request.first_scheduled_time = self._clock()

    def record_preemption(self, req_id: str) -> None:
        """The request lost its KV cache and went back to the waiting queue."""
        self._get_open(req_id).preemptions += 1

    def update_request_progress(
        self, req_id: str, prefill_tokens: int | None = None, decode_tokens: int | None = None,
        *, step: int | None = None,
    ) -> None:
        """Set absolute token counts; the first update with a decode token stamps TTFT.

        ``decode_tokens`` counts every generated token (the first one comes from prefill). With
        ``step`` (the step that produced them), each new token is stamped with it in ``token_steps``;
        give ``step`` on every update or on none.
        """
        request = self._get_open(req_id, step)
        if prefill_tokens is not None:
            request.prefill_tokens = check_int("prefill_tokens", prefill_tokens, 0, ValidationError)
        if decode_tokens is not None:
            request.decode_tokens = check_int("decode_tokens", decode_tokens, 0, ValidationError)
            if decode_tokens >= 1 and request.first_token_time is None:
                request.first_token_time = self._clock()
            if step is not None and decode_tokens > len(request.token_steps):
                request.token_steps.extend([step] * (decode_tokens - len(request.token_steps)))
                if request.first_token_step is None:
                    request.first_token_step = step

    def finish_request(self, req_id: str, *, step: int | None = None) -> RequestMetrics:
        request = self._get_open(req_id, step)
        request.end_time = self._clock()
        request.finish_step = step
        return request

    def get_request_summary(self, req_id: str | None = None) -> dict[str, Any]:
        """Counts, latency percentiles over completed requests (None if none), and preemptions.

        For each of ``queueing, ttft, tpot, e2e`` (defined in the module docstring) in ``steps``
        and in seconds (``s``): ``{name}_{mean,p50,p90,p99}_{unit}``, e.g. ``ttft_p99_steps``.
        With ``req_id``, that one request instead (finished or not): ``req_id``, ``completed``,
        ``duration`` (seconds so far, or to its finish), ``prefill_tokens``, ``decode_tokens``,
        ``total_tokens`` (their sum), ``expected_tokens`` (what tracking started with),
        ``tokens_per_second``, ``preemptions`` and its latencies (``ttft_steps``, ``ttft_s``, ...).
        """
        if req_id is not None:
            return self._one_request_summary(req_id)
        done = [r for r in self.requests.values() if r.is_finished]
        latencies = [r.latency for r in done if r.latency is not None]
        ttfts = [r.time_to_first_token for r in done if r.time_to_first_token is not None]
        summary: dict[str, Any] = {
            "total_requests": len(self.requests),
            "completed_requests": len(done),
            "in_flight_requests": len(self.requests) - len(done),
            "mean_latency_s": statistics.fmean(latencies) if latencies else None,
            "p50_latency_s": _percentile(latencies, 50) if latencies else None,
            "p99_latency_s": _percentile(latencies, 99) if latencies else None,
            "mean_ttft_s": statistics.fmean(ttfts) if ttfts else None,
            "preemptions": sum(r.preemptions for r in self.requests.values()),
        }
        for name in LATENCIES:
            for unit in ("steps", "s"):
                values = [getattr(r, f"{name}_{unit}") for r in done]
                summary.update(_distribution(name, unit, [float(v) for v in values if v is not None]))
        summary["percentile_method"] = PERCENTILE_METHOD
        return summary

    def _one_request_summary(self, req_id: str) -> dict[str, Any]:
        if req_id not in self.requests:
            raise ValidationError(f"unknown request id {req_id!r}; tracked: {sorted(self.requests)}")
        r = self.requests[req_id]
        duration = (r.end_time if r.end_time is not None else self._clock()) - r.start_time
        processed = r.prefill_tokens + r.decode_tokens
        summary: dict[str, Any] = {
            "req_id": req_id, "completed": r.is_finished, "duration": duration,
            "prefill_tokens": r.prefill_tokens, "decode_tokens": r.decode_tokens, "total_tokens": processed,
            "expected_tokens": r.total_tokens, "tokens_per_second": processed / duration if duration > 0 else 0.0,
            "preemptions": r.preemptions,
        }
        for name in LATENCIES:
            summary.update({f"{name}_{unit}": getattr(r, f"{name}_{unit}") for unit in ("steps", "s")})
        return summary

    def get_run_summary(self, num_blocks: int | None = None) -> dict[str, Any]:
        """One table for a whole run: throughput from the steps, latency from the requests.

        ``steps`` counts the steps that ran (status ``completed``; idle ones do not advance
        ``step_id``). ``tokens_per_s`` and ``requests_per_s`` divide by the summed step
        durations. ``gen_tokens``: tokens generated by completed requests (decode tokens
        plus each prefill's first token). ``budget_utilization``: tokens over the summed
        budgets (None unless every step carries ``max_tokens_per_step``). ``kv_utilization``:
        the mean over steps of ``kv_blocks_used / num_blocks`` (None without ``num_blocks``
        or without per-step pool occupancy). ``prefill_tokens_saved``: prefill rows admissions
        took from cached blocks (prefix caching); ``prefix_hit_rate``: those over the admitted
        requests' prefill rows, ``prefix_block_hit_rate``: cached blocks taken over the admitted
        prefills' full blocks (None when there were none). ``kv_evictions``: cached blocks
        evicted for room; ``kv_copies``: copy-on-write copies. Latency keys as in
        :meth:`get_request_summary`.
        """
        if num_blocks is not None:
            check_int("num_blocks", num_blocks, 1, ValidationError)
        ran = [s for s in self.steps if s.status == "completed"]
        total_time = math.fsum(s.step_duration for s in self.steps)
        decode = sum(s.decode_tokens for s in ran)
        prefill = sum(s.prefill_tokens for s in ran)
        done = [r for r in self.requests.values() if r.is_finished]
        gen_tokens = sum(r.decode_tokens for r in done)
        budgets = [s.max_tokens_per_step for s in ran]
        occupancy = [s.kv_blocks_used / num_blocks for s in ran if s.kv_blocks_used is not None and num_blocks]

        def per_s(x: int) -> float:
            return x / total_time if total_time > 0 else 0.0

        def total(name: str) -> int:
            return sum(getattr(s, name) for s in self.steps)

        run: dict[str, Any] = {
            "steps": len(ran),
            "total_tokens": decode + prefill,
            "decode_tokens": decode,
            "prefill_tokens": prefill,
            "tokens_per_step": (decode + prefill) / len(ran) if ran else 0.0,
            "tokens_per_s": per_s(decode + prefill),
            "gen_tokens": gen_tokens,
            "gen_tokens_per_s": per_s(gen_tokens),
            "completed_requests": len(done),
            "requests_per_s": per_s(len(done)),
            "total_time_s": total_time,
            "preemptions": sum(s.preempted_requests for s in self.steps),
            "padding_tokens": sum(s.padding_tokens for s in self.steps),
            "prefill_tokens_saved": total("prefix_hit_tokens"),
            "prefix_hit_rate": _ratio_or_none(total("prefix_hit_tokens"), total("admitted_prompt_tokens")),
            "prefix_block_hit_rate": _ratio_or_none(total("prefix_hit_blocks"), total("admitted_prompt_blocks")),
            "kv_evictions": total("kv_evictions"),
            "kv_copies": total("kv_copies"),
            "budget_utilization": (
                (decode + prefill) / sum(b for b in budgets if b is not None)
                if ran and None not in budgets else None
            ),
            "kv_utilization": statistics.fmean(occupancy) if occupancy else None,
        }
        requests = self.get_request_summary()
        run.update({key: value for key, value in requests.items() if key.startswith(LATENCIES)})
        run["percentile_method"] = PERCENTILE_METHOD
        return run

    def reset(self) -> None:
        self.steps.clear()
        self.requests.clear()

    def __repr__(self) -> str:
        done = sum(r.is_finished for r in self.requests.values())
        return f"MetricsCollector(steps={len(self.steps)}, requests={len(self.requests)}, finished={done})"

    def _repr_html_(self) -> str:
        return render(self)


class PerformanceBenchmark:
    """Times callables side by side so results are compared as ratios measured in one run.

    Absolute seconds depend on the machine and its load; the ratio of two medians
    measured side by side, in one process, is what carries over to another machine.
    """

    def __init__(self, warmup: int = 1, repeats: int = 5, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.warmup = check_int("warmup", warmup, 0)
        self.repeats = check_int("repeats", repeats, 1)
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
