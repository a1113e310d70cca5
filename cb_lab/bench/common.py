"""What the benchmark commands share: a ratio that tolerates a zero, and a device-aware clock."""

from __future__ import annotations

import math
import time

import torch

__all__ = ["now", "ratio"]


def ratio(a: float, b: float) -> float:
    """``a / b``, infinite when ``b`` is 0 (a configuration too fast to time)."""
    return a / b if b > 0 else math.inf


def now(device: torch.device) -> float:
    """``perf_counter`` once the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
