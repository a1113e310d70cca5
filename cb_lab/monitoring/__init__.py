"""Observe the scheduler: throughput and latency metrics, memory profiling, leak detection.

Nothing here runs on its own: you call these objects from your serving loop (or a
plugin hook) once per step, so every number is tied to a step you can point at.
"""

from __future__ import annotations

from cb_lab.monitoring.memory_profiler import (
    DetailedMemoryProfiler,
    MemoryLeakDetector,
    MemoryProfiler,
    MemorySnapshot,
)
from cb_lab.monitoring.metrics import (
    MetricsCollector,
    PerformanceBenchmark,
    RequestMetrics,
    StepMetrics,
)

__all__ = [
    "DetailedMemoryProfiler",
    "MemoryLeakDetector",
    "MemoryProfiler",
    "MemorySnapshot",
    "MetricsCollector",
    "PerformanceBenchmark",
    "RequestMetrics",
    "StepMetrics",
]
