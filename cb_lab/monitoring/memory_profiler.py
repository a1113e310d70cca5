"""Measure how much memory the serving loop uses, and whether it keeps growing.

What is measured, and why these numbers:

- **RSS** (resident set size, from :mod:`psutil`) is the RAM the process really
  occupies. PyTorch allocates tensor storage outside the Python allocator, so
  :mod:`tracemalloc` does not see the KV cache at all; RSS does.
- **VMS** (virtual memory size) is address space reserved, used or not. It is much
  larger than RSS and mostly useful to spot huge reservations.
- **GPU allocated / reserved** come from ``torch.cuda``: *allocated* is what live
  tensors hold, *reserved* is what PyTorch's caching allocator keeps from the
  driver (freed tensors return memory to the cache, not to the GPU). Without CUDA
  they read 0.0.
- **Peak RSS** from ``resource.getrusage`` is the kernel's high-water mark for the
  whole process life, so it catches spikes between two snapshots.

RSS is noisy: the allocator keeps freed pages, and the first steps warm up caches.
So every measurement here is a *delta against a baseline* you set once the system
is warm, and the leak detector looks at the median of the latest readings rather
than at one reading. Nothing runs in a background thread: you call ``sample()`` or
``record_measurement()`` from your own loop (e.g. once per scheduler step).
"""

from __future__ import annotations

import logging
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psutil  # type: ignore[import-untyped, unused-ignore]
import torch

from cb_lab.checks import check_number
from cb_lab.exceptions import MemoryError as CBLabMemoryError

__all__ = ["DetailedMemoryProfiler", "MemoryLeakDetector", "MemoryProfiler", "MemorySnapshot", "make_memory_reader"]

logger = logging.getLogger(__name__)

BYTES_PER_MB = 1024 * 1024
_NO_BASELINE = "no baseline set: call set_baseline() first"

Reader = Callable[[], float]


def make_memory_reader(field: str = "rss") -> Reader:
    """Return a reader of this process's RSS (or another ``memory_info`` field, e.g. "vms") in MB.

    The psutil ``Process`` is created once here, not on every read.
    """
    process = psutil.Process()

    def read_mb() -> float:
        return float(getattr(process.memory_info(), field)) / BYTES_PER_MB

    return read_mb


def read_gpu_mb() -> tuple[float, float]:
    """(allocated, reserved) CUDA memory in MB; (0.0, 0.0) when CUDA is not available."""
    if not torch.cuda.is_available():
        return 0.0, 0.0
    return torch.cuda.memory_allocated() / BYTES_PER_MB, torch.cuda.memory_reserved() / BYTES_PER_MB


def process_peak_rss_mb() -> float:
    """Kernel high-water mark of RSS; ``ru_maxrss`` is KiB on Linux but bytes on macOS."""
    divisor = BYTES_PER_MB if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / divisor


class MemoryProfiler:
    """The simple profiler: read RSS and GPU memory now, and RSS relative to a baseline."""

    def __init__(self, *, read_rss_mb: Reader | None = None) -> None:
        self._read_rss_mb = read_rss_mb or make_memory_reader()
        self.baseline_mb: float | None = None

    def get_current_memory(self) -> float:
        """Process RSS in MB (includes tensor storage, unlike tracemalloc)."""
        return self._read_rss_mb()

    def get_gpu_memory(self) -> float:
        """``torch.cuda.memory_allocated()`` in MB: live tensors only, not the allocator's cache."""
        return read_gpu_mb()[0]

    def set_baseline(self) -> None:
        self.baseline_mb = self.get_current_memory()

    def get_memory_delta(self) -> float:
        """Current RSS minus the baseline, in MB; raises the cb_lab ``MemoryError`` without one."""
        if self.baseline_mb is None:
            raise CBLabMemoryError(_NO_BASELINE)
        return self.get_current_memory() - self.baseline_mb

    def log_memory_usage(self, context: str = "") -> dict[str, float]:
        """Log rss/gpu/delta at INFO and return them; delta_mb is 0.0 when no baseline is set."""
        rss = self.get_current_memory()
        delta = 0.0 if self.baseline_mb is None else rss - self.baseline_mb
        usage = {"rss_mb": rss, "gpu_mb": self.get_gpu_memory(), "delta_mb": delta}
        logger.info("memory [%s]: rss=%.1f MB gpu=%.1f MB delta=%+.1f MB", context, rss, usage["gpu_mb"], delta)
        return usage


@dataclass(frozen=True, slots=True)
class MemorySnapshot:
    """All memory readings at one instant (``timestamp`` from the profiler's clock, in seconds)."""

    timestamp: float
    context: str
    rss_mb: float
    vms_mb: float
    gpu_allocated_mb: float
    gpu_reserved_mb: float


class DetailedMemoryProfiler:
    """Keeps a list of snapshots; deltas are against a baseline snapshot you choose.

    The readers and the clock are injectable (keyword-only) so tests can feed exact numbers.
    """

    def __init__(
        self, sampling_interval: float = 0.1, *, clock: Callable[[], float] = time.perf_counter,
        read_rss_mb: Reader | None = None, read_vms_mb: Reader | None = None,
        read_gpu: Callable[[], tuple[float, float]] = read_gpu_mb,
    ) -> None:
        self.sampling_interval = check_number("sampling_interval", sampling_interval, strict=True)
        self._clock = clock
        self._read_rss_mb = read_rss_mb or make_memory_reader()
        self._read_vms_mb = read_vms_mb or make_memory_reader("vms")
        self._read_gpu = read_gpu
        self.snapshots: list[MemorySnapshot] = []
        self.baseline: MemorySnapshot | None = None
        self.context_deltas: dict[str, dict[str, float]] = {}

    def take_snapshot(self, context: str = "") -> MemorySnapshot:
        """Read everything now and append the snapshot to ``self.snapshots``."""
        return self._snapshot(context, self._clock())

    def _snapshot(self, context: str, timestamp: float) -> MemorySnapshot:
        allocated, reserved = self._read_gpu()
        snapshot = MemorySnapshot(timestamp, context, self._read_rss_mb(), self._read_vms_mb(), allocated, reserved)
        self.snapshots.append(snapshot)
        return snapshot

    def sample(self, context: str = "") -> MemorySnapshot | None:
        """Snapshot only if ``sampling_interval`` s passed since the last snapshot; else None.

        Call it every step: the interval, not the step rate, decides how many snapshots you keep.
        """
        now = self._clock()
        if self.snapshots and now - self.snapshots[-1].timestamp < self.sampling_interval:
            return None
        return self._snapshot(context, now)

    def set_baseline(self, context: str = "baseline") -> None:
        self.baseline = self.take_snapshot(context)

    def get_memory_delta(self, snapshot: MemorySnapshot | None = None) -> dict[str, float]:
        """Deltas of ``snapshot`` (default: the latest, or a fresh one) against the baseline."""
        if self.baseline is None:
            raise CBLabMemoryError(_NO_BASELINE)
        if snapshot is None:
            latest = self.snapshots[-1]
            snapshot = self.take_snapshot("delta") if latest is self.baseline else latest
        return {
            "rss_delta_mb": snapshot.rss_mb - self.baseline.rss_mb,
            "vms_delta_mb": snapshot.vms_mb - self.baseline.vms_mb,
            "gpu_delta_mb": snapshot.gpu_allocated_mb - self.baseline.gpu_allocated_mb,
            "elapsed_s": snapshot.timestamp - self.baseline.timestamp,
        }

    def get_peak_memory_usage(self) -> dict[str, float]:
        """Peaks over the snapshots, plus the kernel's lifetime RSS peak (sees spikes between them)."""
        max_allocated = torch.cuda.max_memory_allocated() / BYTES_PER_MB if torch.cuda.is_available() else 0.0
        return {
            "peak_rss_mb": max((s.rss_mb for s in self.snapshots), default=0.0),
            "peak_gpu_mb": max((s.gpu_allocated_mb for s in self.snapshots), default=0.0),
            "process_peak_rss_mb": process_peak_rss_mb(),
            "peak_gpu_max_allocated_mb": max_allocated,
        }

    @contextmanager
    def profile_context(self, context_name: str) -> Iterator[None]:
        """Record the memory delta of a ``with`` block in ``context_deltas[context_name]``.

        The end snapshot is taken even if the block raises; the exception still propagates.
        """
        if self.baseline is None:
            self.set_baseline()
        start = self.take_snapshot(f"{context_name}:start")
        try:
            yield
        finally:
            end = self.take_snapshot(f"{context_name}:end")
            self.context_deltas[context_name] = {
                "rss_delta_mb": end.rss_mb - start.rss_mb,
                "gpu_delta_mb": end.gpu_allocated_mb - start.gpu_allocated_mb,
                "elapsed_s": end.timestamp - start.timestamp,
            }
            logger.debug("context %s: %s", context_name, self.context_deltas[context_name])

    def clear(self) -> None:
        """Forget snapshots, context deltas and the baseline too."""
        self.snapshots.clear()
        self.baseline = None
        self.context_deltas.clear()


class MemoryLeakDetector:
    """Flags steady RSS growth: a leak is growth that persists, not one high reading.

    ``growth_mb`` is the median of the last quarter of the measurements (at least 3)
    minus the baseline, so a single spike does not trip the detector.
    """

    def __init__(self, threshold_mb: float = 10.0, *, read_rss_mb: Reader | None = None) -> None:
        self.threshold_mb = check_number("threshold_mb", threshold_mb, strict=True)
        self._read_rss_mb = read_rss_mb or make_memory_reader()
        self.baseline_mb: float | None = None
        self.measurements: list[tuple[str, float]] = []

    def set_baseline(self) -> None:
        """Read the baseline RSS now; this also starts a new series (old measurements are dropped)."""
        self.baseline_mb = self._read_rss_mb()
        self.measurements.clear()

    def record_measurement(self, label: str = "") -> None:
        if self.baseline_mb is None:
            raise CBLabMemoryError(_NO_BASELINE)
        self.measurements.append((label, self._read_rss_mb()))

    def check_for_leaks(self) -> dict[str, Any]:
        """Report ``status`` ("no_baseline", "insufficient_data" below 3 measurements, "ok", "leak_detected")."""
        values = [mb for _, mb in self.measurements]
        report: dict[str, Any] = {
            "status": "no_baseline", "baseline_mb": self.baseline_mb, "latest_mb": values[-1] if values else None,
            "growth_mb": None, "slope_mb_per_measurement": None,
            "measurements": len(values), "threshold_mb": self.threshold_mb,
        }
        if self.baseline_mb is None:
            return report
        if len(values) < 3:
            report["status"] = "insufficient_data"
            return report
        tail = values[-max(3, len(values) // 4):]
        growth = statistics.median(tail) - self.baseline_mb
        report["growth_mb"] = growth
        report["slope_mb_per_measurement"] = statistics.linear_regression(range(len(values)), values).slope
        report["status"] = "leak_detected" if growth > self.threshold_mb else "ok"
        return report
