"""Tests for cb_lab.monitoring.metrics: exact numbers from injected clocks, no sleeps."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import psutil  # type: ignore[import-untyped, unused-ignore]
import pytest

from cb_lab.exceptions import ConfigurationError, ValidationError
from cb_lab.monitoring import MetricsCollector, PerformanceBenchmark, StepMetrics

MB = 1024 * 1024


class FakeClock:
    """A clock that only moves when the test moves it."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def stats(**overrides: Any) -> dict[str, Any]:
    """A stats dict shaped exactly like the one ``Scheduler.step()`` returns."""
    base: dict[str, Any] = {
        "step_id": 0,
        "decode_tokens": 4,
        "prefill_tokens": 2,
        "total_tokens": 6,
        "active_requests": 3,
        "finished_requests": 1,
        "step_duration": 0.5,
        "status": "completed",
    }
    base.update(overrides)
    return base


# --- steps -----------------------------------------------------------------------------


def test_record_step_accepts_scheduler_stats_dict() -> None:
    clock = FakeClock(42.0)
    collector = MetricsCollector(enable_memory_profiling=False, clock=clock)
    step = collector.record_step(**stats())
    assert step == StepMetrics(0, 4, 2, 6, 3, 1, 0.5, "completed", 42.0, None)
    assert collector.steps == [step]


def test_total_tokens_is_computed_when_omitted() -> None:
    collector = MetricsCollector(enable_memory_profiling=False)
    step = collector.record_step(1, decode_tokens=5, prefill_tokens=7, active_requests=2,
                                 finished_requests=0, step_duration=1)
    assert step.total_tokens == 12
    assert step.status == "completed"
    assert isinstance(step.step_duration, float)


def test_step_summary_from_known_durations() -> None:
    collector = MetricsCollector(enable_memory_profiling=False)
    collector.record_step(**stats(step_id=0, decode_tokens=4, prefill_tokens=2, total_tokens=6))
    collector.record_step(**stats(step_id=1, decode_tokens=8, prefill_tokens=0, total_tokens=8))
    collector.record_step(**stats(step_id=2, decode_tokens=0, prefill_tokens=0, total_tokens=0,
                                  active_requests=0, finished_requests=0, status="no_active_requests"))
    summary = collector.get_step_summary()
    assert summary["total_steps"] == 3
    assert summary["idle_steps"] == 1
    assert summary["total_tokens_processed"] == 14
    assert summary["total_decode_tokens"] == 12
    assert summary["total_prefill_tokens"] == 2
    assert summary["total_time"] == 1.5
    assert summary["avg_step_duration"] == 0.5
    assert summary["tokens_per_second"] == 14 / 1.5
    assert summary["avg_tokens_per_step"] == 14 / 3
    assert summary["peak_memory_mb"] is None


def test_zero_step_summary_has_no_division_by_zero() -> None:
    summary = MetricsCollector(enable_memory_profiling=False).get_step_summary()
    assert summary == {
        "total_steps": 0, "idle_steps": 0, "total_tokens_processed": 0, "total_decode_tokens": 0,
        "total_prefill_tokens": 0, "total_time": 0.0, "avg_step_duration": 0.0,
        "tokens_per_second": 0.0, "avg_tokens_per_step": 0.0, "peak_memory_mb": None,
        "total_preemptions": 0, "total_padding_tokens": 0,
    }


def test_zero_duration_steps_give_zero_throughput() -> None:
    collector = MetricsCollector(enable_memory_profiling=False)
    collector.record_step(**stats(step_duration=0.0))
    summary = collector.get_step_summary()
    assert summary["tokens_per_second"] == 0.0
    assert summary["total_tokens_processed"] == 6


def test_memory_profiling_stores_injected_rss_and_peak() -> None:
    readings = iter([100.0, 250.0, 180.0])
    collector = MetricsCollector(read_rss_mb=lambda: next(readings))
    for step_id in range(3):
        collector.record_step(**stats(step_id=step_id))
    assert [s.memory_mb for s in collector.steps] == [100.0, 250.0, 180.0]
    assert collector.get_step_summary()["peak_memory_mb"] == 250.0


def test_memory_profiling_defaults_to_process_rss() -> None:
    step = MetricsCollector().record_step(**stats())
    rss_mb = psutil.Process().memory_info().rss / MB
    assert step.memory_mb is not None
    assert step.memory_mb > 0
    assert step.memory_mb == pytest.approx(rss_mb, rel=0.05)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"decode_tokens": -1, "total_tokens": None}, "-1"),
        ({"prefill_tokens": True, "total_tokens": None}, "True"),
        ({"active_requests": 1.5}, "1.5"),
        ({"step_id": "3"}, "'3'"),
        ({"step_duration": float("nan")}, "nan"),
        ({"step_duration": -0.25}, "-0.25"),
        ({"step_duration": float("inf")}, "inf"),
        ({"step_duration": False}, "False"),
        ({"status": "running"}, "'running'"),
        ({"total_tokens": 7}, "(7)"),
        ({"total_tokens": -6}, "-6"),
    ],
)
def test_bad_step_inputs_name_the_bad_value(overrides: dict[str, Any], fragment: str) -> None:
    collector = MetricsCollector(enable_memory_profiling=False)
    with pytest.raises(ValidationError) as excinfo:
        collector.record_step(**stats(**overrides))
    assert fragment in str(excinfo.value)
    assert collector.steps == []


def test_total_tokens_mismatch_names_both_numbers() -> None:
    with pytest.raises(ValidationError, match=r"total_tokens \(7\).*4 \+ 2 = 6"):
        MetricsCollector(enable_memory_profiling=False).record_step(**stats(total_tokens=7))


def test_unknown_status_says_what_is_expected() -> None:
    with pytest.raises(ValidationError, match="no_active_requests"):
        MetricsCollector(enable_memory_profiling=False).record_step(**stats(status="done"))


# --- requests --------------------------------------------------------------------------


def test_request_lifecycle_sets_first_token_time_and_latency() -> None:
    clock = FakeClock(10.0)
    collector = MetricsCollector(enable_memory_profiling=False, clock=clock)
    collector.start_request_tracking("a", total_tokens=8)
    clock.t = 11.0
    collector.update_request_progress("a", prefill_tokens=5)
    request = collector.requests["a"]
    assert request.first_token_time is None
    assert request.time_to_first_token is None
    clock.t = 12.0
    collector.update_request_progress("a", decode_tokens=1)
    clock.t = 13.0
    collector.update_request_progress("a", prefill_tokens=5, decode_tokens=3)
    assert request.first_token_time == 12.0
    assert not request.is_finished
    assert request.latency is None
    clock.t = 15.0
    finished = collector.finish_request("a")
    assert finished is request
    assert (finished.prefill_tokens, finished.decode_tokens, finished.total_tokens) == (5, 3, 8)
    assert finished.is_finished
    assert finished.latency == 5.0
    assert finished.time_to_first_token == 2.0


def test_progress_updates_are_absolute_counts() -> None:
    collector = MetricsCollector(enable_memory_profiling=False)
    collector.start_request_tracking("a", total_tokens=10)
    collector.update_request_progress("a", decode_tokens=3)
    collector.update_request_progress("a", decode_tokens=4)
    collector.update_request_progress("a")
    assert collector.requests["a"].decode_tokens == 4
    assert collector.requests["a"].prefill_tokens == 0


def test_decode_zero_does_not_set_first_token_time() -> None:
    collector = MetricsCollector(enable_memory_profiling=False)
    collector.start_request_tracking("a", total_tokens=10)
    collector.update_request_progress("a", decode_tokens=0)
    assert collector.requests["a"].first_token_time is None


def test_request_summary_percentiles_on_known_latencies() -> None:
    clock = FakeClock(0.0)
    collector = MetricsCollector(enable_memory_profiling=False, clock=clock)
    for i in range(1, 101):
        collector.start_request_tracking(f"r{i}", total_tokens=1)
    collector.start_request_tracking("open", total_tokens=1)
    for i in range(1, 101):  # request r{i} finishes at t = i, so its latency is i seconds
        clock.t = float(i)
        if i % 2 == 0:
            collector.update_request_progress(f"r{i}", decode_tokens=1)  # TTFT = latency for even ids
        collector.finish_request(f"r{i}")
    summary = collector.get_request_summary()
    assert summary["total_requests"] == 101
    assert summary["completed_requests"] == 100
    assert summary["in_flight_requests"] == 1
    assert summary["mean_latency_s"] == 50.5
    assert summary["p50_latency_s"] == 50.5
    assert summary["p99_latency_s"] == pytest.approx(99.01)
    assert summary["mean_ttft_s"] == statistics.fmean(range(2, 101, 2))
    assert summary["percentile_method"] == "statistics.quantiles(n=100, method='inclusive')"


def test_single_completed_request_is_its_own_percentile() -> None:
    clock = FakeClock(1.0)
    collector = MetricsCollector(enable_memory_profiling=False, clock=clock)
    collector.start_request_tracking("a", total_tokens=1)
    clock.t = 3.5
    collector.finish_request("a")
    summary = collector.get_request_summary()
    assert summary["p50_latency_s"] == summary["p99_latency_s"] == summary["mean_latency_s"] == 2.5
    assert summary["mean_ttft_s"] is None


def test_request_summary_without_completed_requests() -> None:
    collector = MetricsCollector(enable_memory_profiling=False)
    collector.start_request_tracking("a", total_tokens=3)
    collector.update_request_progress("a", decode_tokens=1)
    summary = collector.get_request_summary()
    assert (summary["total_requests"], summary["completed_requests"], summary["in_flight_requests"]) == (1, 0, 1)
    for key in ("mean_latency_s", "p50_latency_s", "p99_latency_s", "mean_ttft_s"):
        assert summary[key] is None


def test_tracking_without_total_tokens_and_one_request_summary() -> None:
    """The original cb-lab's calls: ``start_request_tracking(req_id)`` and ``get_request_summary(req_id)``."""
    clock = FakeClock(10.0)
    collector = MetricsCollector(enable_memory_profiling=False, clock=clock)
    collector.start_request_tracking("a", step=2)  # total_tokens defaults to 0: unknown
    collector.start_request_tracking("b", total_tokens=9)
    assert collector.requests["a"].total_tokens == 0
    clock.t = 11.0
    collector.record_request_scheduled("a", 3)
    collector.update_request_progress("a", prefill_tokens=6, decode_tokens=1, step=4)
    clock.t = 12.0
    open_summary = collector.get_request_summary("a")  # not finished: its duration so far
    assert (open_summary["completed"], open_summary["duration"], open_summary["e2e_steps"]) == (False, 2.0, None)
    clock.t = 14.0
    collector.update_request_progress("a", decode_tokens=3, step=6)
    collector.finish_request("a", step=6)
    clock.t = 20.0  # a finished request's duration stops at its finish
    summary = collector.get_request_summary("a")
    assert summary == {
        "req_id": "a", "completed": True, "duration": 4.0, "prefill_tokens": 6, "decode_tokens": 3,
        "total_tokens": 9, "expected_tokens": 0, "tokens_per_second": 9 / 4.0, "preemptions": 0,
        "queueing_steps": 1, "queueing_s": 1.0, "ttft_steps": 3, "ttft_s": 1.0, "tpot_steps": 1.0,
        "tpot_s": 1.5, "e2e_steps": 5, "e2e_s": 4.0,
    }
    assert collector.get_request_summary("b")["expected_tokens"] == 9
    assert collector.get_request_summary()["completed_requests"] == 1  # without an id: every request
    with pytest.raises(ValidationError, match=r"'ghost'.*\['a', 'b'\]"):
        collector.get_request_summary("ghost")


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.update_request_progress("ghost", decode_tokens=1),
        lambda c: c.finish_request("ghost"),
    ],
)
def test_unknown_request_id_says_to_start_tracking(call: Callable[[MetricsCollector], object]) -> None:
    collector = MetricsCollector(enable_memory_profiling=False)
    with pytest.raises(ValidationError, match=r"'ghost'.*start_request_tracking"):
        call(collector)


def test_duplicate_and_negative_and_double_finish_are_rejected() -> None:
    collector = MetricsCollector(enable_memory_profiling=False)
    collector.start_request_tracking("a", total_tokens=3)
    with pytest.raises(ValidationError, match="'a'"):
        collector.start_request_tracking("a", total_tokens=3)
    with pytest.raises(ValidationError, match="-2"):
        collector.start_request_tracking("b", total_tokens=-2)
    assert "b" not in collector.requests
    with pytest.raises(ValidationError, match="-1"):
        collector.update_request_progress("a", prefill_tokens=-1)
    with pytest.raises(ValidationError, match="2.0"):
        collector.update_request_progress("a", decode_tokens=2.0)  # type: ignore[arg-type]
    collector.finish_request("a")
    with pytest.raises(ValidationError, match="already finished"):
        collector.finish_request("a")
    with pytest.raises(ValidationError, match="already finished"):
        collector.update_request_progress("a", decode_tokens=2)


def test_reset_forgets_steps_and_requests() -> None:
    collector = MetricsCollector(enable_memory_profiling=False)
    collector.record_step(**stats())
    collector.start_request_tracking("a", total_tokens=1)
    collector.reset()
    assert collector.steps == []
    assert collector.requests == {}
    assert collector.get_step_summary()["total_steps"] == 0
    collector.start_request_tracking("a", total_tokens=1)  # the id is free again


# --- benchmark -------------------------------------------------------------------------


def timed_fn(clock: FakeClock, durations: list[float]) -> Callable[[], None]:
    """A callable whose k-th call advances the fake clock by durations[k]."""
    pending = iter(durations)

    def fn() -> None:
        clock.t += next(pending)

    return fn


def test_measure_reports_exact_statistics_with_fake_clock() -> None:
    clock = FakeClock()
    bench = PerformanceBenchmark(warmup=1, repeats=5, clock=clock)
    # The first duration (9.0) is the warm-up call: it must not be counted.
    result = bench.measure("slow", timed_fn(clock, [9.0, 0.5, 0.25, 0.125, 1.0, 0.75]))
    assert result == {"best_s": 0.125, "median_s": 0.5, "mean_s": 2.625 / 5, "repeats": 5.0}
    assert bench.results == {"slow": result}


def test_compare_is_ratio_of_medians() -> None:
    clock = FakeClock()
    bench = PerformanceBenchmark(warmup=0, repeats=3, clock=clock)
    bench.measure("baseline", timed_fn(clock, [1.0, 0.75, 2.0]))
    bench.measure("candidate", timed_fn(clock, [0.25, 0.5, 0.25]))
    assert bench.compare("baseline", "candidate") == 4.0  # medians 1.0 and 0.25
    assert bench.compare("candidate", "baseline") == 0.25


def test_results_are_copies() -> None:
    clock = FakeClock()
    bench = PerformanceBenchmark(warmup=0, repeats=1, clock=clock)
    returned = bench.measure("x", timed_fn(clock, [1.0]))
    returned["median_s"] = 99.0
    bench.results["x"]["median_s"] = 99.0
    assert bench.results["x"]["median_s"] == 1.0


def test_compare_unknown_name_and_zero_median() -> None:
    clock = FakeClock()
    bench = PerformanceBenchmark(warmup=0, repeats=2, clock=clock)
    bench.measure("a", timed_fn(clock, [1.0, 1.0]))
    bench.measure("instant", timed_fn(clock, [0.0, 0.0]))
    with pytest.raises(ValidationError, match=r"'b'.*measure"):
        bench.compare("a", "b")
    with pytest.raises(ValidationError, match="'instant'"):
        bench.compare("a", "instant")


def test_measure_with_real_clock_has_consistent_structure() -> None:
    calls: list[int] = []
    bench = PerformanceBenchmark(warmup=2, repeats=3)
    result = bench.measure("noop", lambda: calls.append(1))
    assert len(calls) == 5
    assert result["repeats"] == 3.0
    assert 0.0 <= result["best_s"] <= result["median_s"]


@pytest.mark.parametrize(("warmup", "repeats"), [(-1, 5), (True, 5), (1, 0), (1, 2.0), (1, False)])
def test_benchmark_rejects_bad_configuration(warmup: Any, repeats: Any) -> None:
    with pytest.raises(ConfigurationError):
        PerformanceBenchmark(warmup=warmup, repeats=repeats)


# --- latency in steps, and the run summary ------------------------------------------------


def test_step_latencies_follow_their_definitions() -> None:
    clock = FakeClock(100.0)
    collector = MetricsCollector(enable_memory_profiling=False, clock=clock)
    collector.start_request_tracking("a", total_tokens=9, step=3)  # arrives at step 3, t = 100
    clock.t = 101.0
    collector.record_request_scheduled("a", 4)  # waits one step
    collector.record_request_scheduled("a", 6)  # only the first counts
    clock.t = 102.5
    collector.update_request_progress("a", prefill_tokens=5, decode_tokens=1, step=5)  # first token in step 5
    collector.record_preemption("a")
    clock.t = 104.0
    collector.update_request_progress("a", decode_tokens=3, step=8)  # two tokens in one report: both step 8
    clock.t = 110.5
    collector.update_request_progress("a", decode_tokens=4, step=11)
    request = collector.finish_request("a", step=11)
    assert request.token_steps == [5, 8, 8, 11]
    assert (request.arrival_step, request.first_scheduled_step, request.first_token_step, request.finish_step) == (
        3, 4, 5, 11)
    assert request.queueing_steps == 1  # 4 - 3
    assert request.ttft_steps == 3  # 5 - 3 + 1: steps 3, 4 and 5
    assert request.e2e_steps == 9  # 11 - 3 + 1
    assert request.tpot_steps == 2.0  # (11 - 5) / (4 - 1)
    assert (request.queueing_s, request.ttft_s, request.e2e_s, request.tpot_s) == (1.0, 2.5, 10.5, 8.0 / 3)
    assert request.preemptions == 1


def test_a_first_token_in_the_arrival_step_is_ttft_one_and_one_token_has_no_tpot() -> None:
    collector = MetricsCollector(enable_memory_profiling=False)
    collector.start_request_tracking("a", total_tokens=3, step=7)
    collector.record_request_scheduled("a", 7)
    collector.update_request_progress("a", prefill_tokens=2, decode_tokens=1, step=7)
    request = collector.finish_request("a", step=7)
    assert (request.queueing_steps, request.ttft_steps, request.e2e_steps) == (0, 1, 1)
    assert request.tpot_steps is None and request.tpot_s is None
    untimed = MetricsCollector(enable_memory_profiling=False)  # no steps given: step latencies are None
    untimed.start_request_tracking("b", total_tokens=3)
    untimed.update_request_progress("b", decode_tokens=2)
    done = untimed.finish_request("b")
    assert (done.queueing_steps, done.ttft_steps, done.e2e_steps, done.tpot_steps, done.token_steps) == (
        None, None, None, None, [])


def test_steps_before_arrival_and_bad_steps_are_rejected() -> None:
    collector = MetricsCollector(enable_memory_profiling=False)
    collector.start_request_tracking("a", total_tokens=3, step=5)
    with pytest.raises(ValidationError, match="arrived at step 5; step 4"):
        collector.record_request_scheduled("a", 4)
    for bad in (-1, True, 2.0):
        with pytest.raises(ValidationError, match="step must be an int"):
            collector.update_request_progress("a", decode_tokens=1, step=bad)
    with pytest.raises(ValidationError, match="'ghost'"):
        collector.record_preemption("ghost")
    with pytest.raises(ValidationError, match="kv_blocks_used"):
        collector.record_step(**stats(kv_blocks_used=-1))


def test_request_summary_percentiles_in_steps() -> None:
    collector = MetricsCollector(enable_memory_profiling=False)
    for i in range(1, 11):  # request i arrives at step 0 and gets its only token, and finishes, at step i - 1
        collector.start_request_tracking(f"r{i}", total_tokens=2, step=0)
        collector.record_request_scheduled(f"r{i}", i - 1)
        collector.update_request_progress(f"r{i}", decode_tokens=1, step=i - 1)
        collector.finish_request(f"r{i}", step=i - 1)
    summary = collector.get_request_summary()
    ttfts = list(range(1, 11))  # ttft = e2e = i, queueing = i - 1
    assert summary["ttft_mean_steps"] == 5.5 and summary["e2e_p50_steps"] == 5.5
    assert summary["ttft_p90_steps"] == pytest.approx(statistics.quantiles(ttfts, n=100, method="inclusive")[89])
    assert summary["ttft_p90_steps"] == pytest.approx(9.1)  # inclusive: 1 + 0.90 * (10 - 1)
    assert summary["ttft_p99_steps"] == pytest.approx(9.91)
    assert summary["queueing_p50_steps"] == 4.5
    assert summary["tpot_p50_steps"] is None  # every request made one token
    assert summary["preemptions"] == 0
    assert summary["percentile_method"] == "statistics.quantiles(n=100, method='inclusive')"


def test_run_summary_from_known_steps_and_requests() -> None:
    collector = MetricsCollector(enable_memory_profiling=False)
    collector.record_step(**stats(step_id=0, decode_tokens=0, prefill_tokens=4, total_tokens=4, step_duration=0.5),
                          kv_blocks_used=2, max_tokens_per_step=4)
    collector.record_step(**stats(step_id=1, decode_tokens=2, prefill_tokens=1, total_tokens=3, step_duration=0.25,
                                  preempted_requests=1, padding_tokens=1), kv_blocks_used=4, max_tokens_per_step=4)
    collector.record_step(**stats(step_id=2, decode_tokens=0, prefill_tokens=0, total_tokens=0, step_duration=0.25,
                                  status="no_active_requests"))  # idle: not a step that ran
    collector.start_request_tracking("a", total_tokens=6, step=0)
    collector.update_request_progress("a", decode_tokens=2, step=1)
    collector.finish_request("a", step=1)
    collector.start_request_tracking("open", total_tokens=6, step=1)
    run = collector.get_run_summary(num_blocks=8)
    assert (run["steps"], run["total_tokens"], run["decode_tokens"], run["prefill_tokens"]) == (2, 7, 2, 5)
    assert run["tokens_per_step"] == 3.5 and run["tokens_per_s"] == 7.0  # 7 tokens in 1.0 s
    assert (run["gen_tokens"], run["completed_requests"], run["requests_per_s"]) == (2, 1, 1.0)
    assert (run["preemptions"], run["padding_tokens"]) == (1, 1)
    assert run["kv_utilization"] == 0.375  # mean of 2/8 and 4/8
    assert run["budget_utilization"] == 7 / 8
    assert run["ttft_p50_steps"] == 2 and run["e2e_p99_steps"] == 2
    assert collector.get_run_summary()["kv_utilization"] is None  # no pool size, no utilization
    with pytest.raises(ValidationError, match="num_blocks"):
        collector.get_run_summary(num_blocks=0)
    empty = MetricsCollector(enable_memory_profiling=False).get_run_summary()
    assert empty["steps"] == 0 and empty["tokens_per_step"] == 0.0 and empty["ttft_p50_steps"] is None
