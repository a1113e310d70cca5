"""Tests for cb_lab.monitoring.memory_profiler: injected readers and clocks, no real growth."""

from __future__ import annotations

import builtins
import logging
from typing import Any

import psutil  # type: ignore[import-untyped, unused-ignore]
import pytest
import torch

from cb_lab.exceptions import CBLabException, ConfigurationError
from cb_lab.exceptions import MemoryError as CBLabMemoryError
from cb_lab.monitoring import (
    DetailedMemoryProfiler,
    MemoryLeakDetector,
    MemoryProfiler,
    MemorySnapshot,
    memory_profiler,
)

MB = 1024 * 1024
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")


class FakeMemory:
    """Readers and a clock whose values the test sets directly."""

    def __init__(self, rss: float = 100.0, vms: float = 500.0) -> None:
        self.rss = rss
        self.vms = vms
        self.gpu = (0.0, 0.0)
        self.t = 0.0

    def clock(self) -> float:
        return self.t

    def read_rss(self) -> float:
        return self.rss

    def read_vms(self) -> float:
        return self.vms

    def read_gpu(self) -> tuple[float, float]:
        return self.gpu

    def profiler(self, sampling_interval: float = 0.1) -> DetailedMemoryProfiler:
        return DetailedMemoryProfiler(
            sampling_interval, clock=self.clock, read_rss_mb=self.read_rss,
            read_vms_mb=self.read_vms, read_gpu=self.read_gpu,
        )


def detector(values: list[float], threshold_mb: float = 10.0) -> MemoryLeakDetector:
    """A leak detector whose baseline is the first value and whose measurements are the rest."""
    readings = iter(values)
    leak_detector = MemoryLeakDetector(threshold_mb, read_rss_mb=lambda: next(readings))
    leak_detector.set_baseline()
    for _ in values[1:]:
        leak_detector.record_measurement()
    return leak_detector


def process_rss_mb() -> float:
    return float(psutil.Process().memory_info().rss) / MB


# --- MemoryProfiler --------------------------------------------------------------------


def test_current_memory_is_process_rss() -> None:
    current = MemoryProfiler().get_current_memory()
    assert current > 0
    assert current == pytest.approx(process_rss_mb(), rel=0.05)


@no_cuda
def test_gpu_memory_is_zero_without_cuda() -> None:
    assert MemoryProfiler().get_gpu_memory() == 0.0


def test_gpu_readings_convert_cuda_bytes_to_mb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 3 * MB)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 8 * MB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 5 * MB)
    assert memory_profiler.read_gpu_mb() == (3.0, 8.0)
    assert MemoryProfiler(read_rss_mb=lambda: 1.0).get_gpu_memory() == 3.0
    assert DetailedMemoryProfiler().get_peak_memory_usage()["peak_gpu_max_allocated_mb"] == 5.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_memory_sees_a_cuda_tensor() -> None:
    profiler = MemoryProfiler()
    before = profiler.get_gpu_memory()
    tensor = torch.empty(16 * MB, dtype=torch.uint8, device="cuda")
    assert profiler.get_gpu_memory() - before >= 16.0
    del tensor


def test_memory_delta_needs_a_baseline() -> None:
    with pytest.raises(CBLabMemoryError, match=r"set_baseline\(\)") as excinfo:
        MemoryProfiler().get_memory_delta()
    assert isinstance(excinfo.value, CBLabException)
    assert not isinstance(excinfo.value, builtins.MemoryError)


def test_memory_delta_and_log_from_injected_reader(caplog: pytest.LogCaptureFixture) -> None:
    memory = FakeMemory(rss=200.0)
    profiler = MemoryProfiler(read_rss_mb=memory.read_rss)
    with caplog.at_level(logging.INFO, logger="cb_lab.monitoring.memory_profiler"):
        before = profiler.log_memory_usage("warmup")
        profiler.set_baseline()
        memory.rss = 232.5
        after = profiler.log_memory_usage("after step")
    assert profiler.get_memory_delta() == 32.5
    assert before["delta_mb"] == 0.0
    assert after["rss_mb"] == 232.5
    assert after["delta_mb"] == 32.5
    assert set(after) == {"rss_mb", "gpu_mb", "delta_mb"}
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(messages) == 2
    assert "after step" in messages[1]
    assert "232.5" in messages[1]


# --- DetailedMemoryProfiler ------------------------------------------------------------


def test_take_snapshot_records_injected_readings() -> None:
    memory = FakeMemory(rss=120.0, vms=640.0)
    memory.gpu = (3.0, 8.0)
    memory.t = 7.0
    profiler = memory.profiler()
    snapshot = profiler.take_snapshot("step 1")
    assert snapshot == MemorySnapshot(7.0, "step 1", 120.0, 640.0, 3.0, 8.0)
    assert profiler.snapshots == [snapshot]


def test_default_readers_read_this_process() -> None:
    snapshot = DetailedMemoryProfiler().take_snapshot()
    assert snapshot.rss_mb == pytest.approx(process_rss_mb(), rel=0.05)
    assert snapshot.vms_mb >= snapshot.rss_mb > 0


def test_memory_delta_against_baseline() -> None:
    memory = FakeMemory(rss=100.0, vms=500.0)
    memory.t = 1.0
    profiler = memory.profiler()
    profiler.set_baseline()
    assert profiler.baseline is not None and profiler.baseline.context == "baseline"
    memory.rss, memory.vms, memory.gpu, memory.t = 130.0, 540.0, (4.0, 6.0), 3.5
    delta = profiler.get_memory_delta()  # only the baseline exists: a fresh snapshot is taken
    assert delta == {"rss_delta_mb": 30.0, "vms_delta_mb": 40.0, "gpu_delta_mb": 4.0, "elapsed_s": 2.5}
    assert len(profiler.snapshots) == 2
    memory.rss = 999.0
    assert profiler.get_memory_delta()["rss_delta_mb"] == 30.0  # reuses the latest snapshot
    assert len(profiler.snapshots) == 2
    explicit = MemorySnapshot(11.0, "x", 90.0, 500.0, 0.0, 0.0)
    assert profiler.get_memory_delta(explicit)["rss_delta_mb"] == -10.0
    assert profiler.get_memory_delta(explicit)["elapsed_s"] == 10.0


def test_detailed_delta_without_baseline_raises_cb_lab_memory_error() -> None:
    profiler = FakeMemory().profiler()
    profiler.take_snapshot()
    with pytest.raises(CBLabMemoryError, match=r"set_baseline\(\)"):
        profiler.get_memory_delta()


def test_sample_honours_interval_with_fake_clock() -> None:
    memory = FakeMemory()
    profiler = memory.profiler(sampling_interval=0.5)
    taken = []
    for t in (0.0, 0.25, 0.5, 0.75, 0.99, 1.25, 1.5):
        memory.t = t
        taken.append(profiler.sample(f"t={t}") is not None)
    assert taken == [True, False, True, False, False, True, False]
    assert [s.timestamp for s in profiler.snapshots] == [0.0, 0.5, 1.25]
    assert profiler.snapshots[-1].context == "t=1.25"


def test_profile_context_records_block_delta_and_sets_baseline() -> None:
    memory = FakeMemory(rss=100.0)
    profiler = memory.profiler()
    with profiler.profile_context("prefill"):
        memory.rss, memory.gpu, memory.t = 160.0, (2.0, 2.0), 0.75
    assert profiler.context_deltas["prefill"] == {"rss_delta_mb": 60.0, "gpu_delta_mb": 2.0, "elapsed_s": 0.75}
    assert [s.context for s in profiler.snapshots] == ["baseline", "prefill:start", "prefill:end"]
    assert profiler.get_memory_delta()["rss_delta_mb"] == 60.0


def test_profile_context_keeps_existing_baseline() -> None:
    memory = FakeMemory(rss=50.0)
    profiler = memory.profiler()
    profiler.set_baseline("warm")
    memory.rss = 100.0
    with profiler.profile_context("decode"):
        memory.rss = 110.0
    assert profiler.baseline is not None and profiler.baseline.rss_mb == 50.0
    assert profiler.context_deltas["decode"]["rss_delta_mb"] == 10.0
    assert profiler.get_memory_delta()["rss_delta_mb"] == 60.0


def test_profile_context_records_end_snapshot_on_exception() -> None:
    memory = FakeMemory(rss=100.0)
    profiler = memory.profiler()
    with pytest.raises(RuntimeError, match="boom"):
        with profiler.profile_context("step"):
            memory.rss = 125.0
            raise RuntimeError("boom")
    assert profiler.snapshots[-1].context == "step:end"
    assert profiler.context_deltas["step"]["rss_delta_mb"] == 25.0


def test_peak_memory_usage_over_snapshots() -> None:
    memory = FakeMemory()
    profiler = memory.profiler()
    for rss, gpu in ((100.0, (1.0, 2.0)), (300.0, (5.0, 6.0)), (200.0, (3.0, 8.0))):
        memory.rss, memory.gpu = rss, gpu
        profiler.take_snapshot()
    peaks = profiler.get_peak_memory_usage()
    assert peaks["peak_rss_mb"] == 300.0
    assert peaks["peak_gpu_mb"] == 5.0
    # The kernel's high-water mark is at or above the RSS right now (up to a little accounting lag).
    assert peaks["process_peak_rss_mb"] >= process_rss_mb() * 0.95


@no_cuda
def test_peak_memory_usage_without_snapshots_or_cuda() -> None:
    peaks = FakeMemory().profiler().get_peak_memory_usage()
    assert peaks["peak_rss_mb"] == 0.0
    assert peaks["peak_gpu_mb"] == 0.0
    assert peaks["peak_gpu_max_allocated_mb"] == 0.0
    assert peaks["process_peak_rss_mb"] > 0.0


def test_clear_forgets_everything() -> None:
    profiler = FakeMemory().profiler()
    with profiler.profile_context("x"):
        pass
    profiler.clear()
    assert (profiler.snapshots, profiler.baseline, profiler.context_deltas) == ([], None, {})
    with pytest.raises(CBLabMemoryError):
        profiler.get_memory_delta()


@pytest.mark.parametrize("interval", [0, -0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_sampling_interval_is_a_configuration_error(interval: Any) -> None:
    with pytest.raises(ConfigurationError, match="sampling_interval"):
        DetailedMemoryProfiler(interval)


# --- MemoryLeakDetector ----------------------------------------------------------------


def test_flat_series_is_ok() -> None:
    report = detector([100.0, 100.5, 99.75, 100.25, 100.0, 99.5, 100.25, 100.0, 100.5]).check_for_leaks()
    assert report["status"] == "ok"
    assert report["measurements"] == 8
    assert report["baseline_mb"] == 100.0
    assert report["latest_mb"] == 100.5
    assert report["growth_mb"] == 0.25  # median of the last 3: (100.25, 100.0, 100.5)
    assert report["threshold_mb"] == 10.0


def test_growing_series_is_a_leak() -> None:
    report = detector([100.0 + 5 * i for i in range(9)]).check_for_leaks()  # 105, 110, ..., 140
    assert report["status"] == "leak_detected"
    assert report["growth_mb"] == 35.0  # median of (130, 135, 140) - 100
    assert report["slope_mb_per_measurement"] == pytest.approx(5.0)


def test_growth_uses_the_last_quarter_of_long_series() -> None:
    values = [100.0] + [100.0] * 12 + [120.0, 121.0, 122.0, 123.0]  # 16 measurements: last 4
    report = detector(values).check_for_leaks()
    assert report["growth_mb"] == 21.5
    assert report["status"] == "leak_detected"


def test_growth_at_threshold_is_not_a_leak() -> None:
    report = detector([100.0, 110.0, 110.0, 110.0], threshold_mb=10.0).check_for_leaks()
    assert report["growth_mb"] == 10.0
    assert report["status"] == "ok"


@pytest.mark.parametrize(
    "values",
    [
        [100.0, 100.0, 100.0, 100.0, 500.0, 100.0, 100.0, 100.0, 100.0],  # spike in the middle
        [100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 500.0],  # spike as the last reading
    ],
)
def test_single_spike_is_not_a_leak(values: list[float]) -> None:
    report = detector(values).check_for_leaks()
    assert report["status"] == "ok"
    assert report["growth_mb"] == 0.0


def test_fewer_than_three_measurements_is_insufficient_data() -> None:
    report = detector([100.0, 150.0, 200.0]).check_for_leaks()
    assert report["status"] == "insufficient_data"
    assert report["measurements"] == 2
    assert report["latest_mb"] == 200.0
    assert report["growth_mb"] is None


def test_no_baseline_status_and_record_error() -> None:
    leak_detector = MemoryLeakDetector(read_rss_mb=lambda: 100.0)
    report = leak_detector.check_for_leaks()
    assert report["status"] == "no_baseline"
    assert report["measurements"] == 0
    assert report["baseline_mb"] is None
    with pytest.raises(CBLabMemoryError, match=r"set_baseline\(\)"):
        leak_detector.record_measurement("step 1")


def test_measurements_keep_labels_and_set_baseline_starts_a_new_series() -> None:
    readings = iter([100.0, 101.0, 102.0, 50.0])
    leak_detector = MemoryLeakDetector(read_rss_mb=lambda: next(readings))
    leak_detector.set_baseline()
    leak_detector.record_measurement("step 1")
    leak_detector.record_measurement("step 2")
    assert leak_detector.measurements == [("step 1", 101.0), ("step 2", 102.0)]
    leak_detector.set_baseline()
    assert leak_detector.baseline_mb == 50.0
    assert leak_detector.measurements == []


def test_default_reader_measures_this_process() -> None:
    leak_detector = MemoryLeakDetector()
    leak_detector.set_baseline()
    assert leak_detector.baseline_mb is not None
    assert leak_detector.baseline_mb == pytest.approx(process_rss_mb(), rel=0.05)


@pytest.mark.parametrize("threshold", [0, -1.0, float("nan"), float("inf"), True, None])
def test_bad_threshold_is_a_configuration_error(threshold: Any) -> None:
    with pytest.raises(ConfigurationError, match="threshold_mb"):
        MemoryLeakDetector(threshold)
