"""Built-in plugins: logging, metrics, KV compression and attention pictures.

Each one is small and shows one way to hook into a run:

- :class:`LoggingPlugin` logs every plan, step and completion through :mod:`logging`.
- :class:`MetricsPlugin` feeds a :class:`MetricsCollector`, so metrics need no manual calls.
- :class:`CacheCompressionPlugin` stores K/V in a narrower float type (really fewer bytes)
  and reports what that saved and what it cost in output error.
- :class:`AttentionVisualizationPlugin` records attention probabilities and writes them
  as ``.npy`` arrays (and PNG heatmaps when matplotlib is installed).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cb_lab.checks import check_int
from cb_lab.exceptions import ConfigurationError, ValidationError
from cb_lab.monitoring.metrics import MetricsCollector
from cb_lab.plugins.base import AttentionPlugin, CachePlugin, SchedulerPlugin

if TYPE_CHECKING:
    from cb_lab.core.block_pool import BlockPool
    from cb_lab.core.kv_cache import BaseKVCache
    from cb_lab.core.plan import StepPlan
    from cb_lab.core.request import Request

logger = logging.getLogger(__name__)

__all__ = ["AttentionVisualizationPlugin", "CacheCompressionPlugin", "LoggingPlugin", "MetricsPlugin"]

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class LoggingPlugin(SchedulerPlugin):
    """Logs each step's plan, its stats and every completion at ``log_level``.

    Messages go to the ``cb_lab.plugins.builtin`` logger; call
    ``logging.basicConfig(level=logging.INFO)`` (or attach a handler) to see them.
    """

    options = ("log_level",)

    def __init__(self, log_level: str = "INFO") -> None:
        self.log_level = "INFO"
        self.configure({"log_level": log_level})

    def configure(self, config: Mapping[str, Any]) -> None:
        super().configure(config)
        level = config.get("log_level", self.log_level)
        if not isinstance(level, str) or level.upper() not in _LEVELS:
            raise ConfigurationError(f"log_level must be one of {list(_LEVELS)}, got {level!r}")
        self.log_level = level.upper()
        self.level: int = getattr(logging, self.log_level)

    def before_step(self, plan: StepPlan) -> None:
        logger.log(self.level, "%r", plan)

    def after_step(self, stats: dict[str, Any]) -> None:
        logger.log(
            self.level, "step %d done: %d decode + %d prefill tokens, %d active, %d finished, %.2f ms",
            stats["step_id"], stats["decode_tokens"], stats["prefill_tokens"],
            stats["active_requests"], stats["finished_requests"], 1e3 * stats["step_duration"],
        )

    def on_request_completion(self, request: Request) -> None:
        logger.log(self.level, "finished %r", request)


class MetricsPlugin(SchedulerPlugin):
    """Records every step and every request in ``self.collector`` (a MetricsCollector).

    A request is tracked from its arrival (``on_request_added``: its arrival step); it is
    first scheduled in the first plan that runs one of its tokens; its progress counts
    (``prefill_pos``, generated tokens) are reported after each step with that step's id,
    so latencies come out in steps as well as seconds. When requests share a ``BlockPool``,
    each step also records how many of its blocks are in use (``kv_utilization``).
    """

    def __init__(self, collector: MetricsCollector | None = None) -> None:
        self.collector = collector if collector is not None else MetricsCollector()
        self._plan: StepPlan | None = None
        self._in_step: list[Request] = []
        self._pools: dict[int, BlockPool] = {}  # the shared pools of the requests seen, by id

    def _track(self, req: Request, step: int | None = None) -> None:
        if req.req_id not in self.collector.requests:
            self.collector.start_request_tracking(req.req_id, req.prompt_len + req.max_new_tokens, step=step)
        pool = req.kv_cache.shared_pool
        if pool is not None:
            self._pools.setdefault(id(pool), pool)

    def on_request_added(self, request: Request, step_id: int) -> None:
        self._track(request, step_id)

    def before_step(self, plan: StepPlan) -> None:
        self._plan = plan
        self._in_step = [*plan.decode, *(chunk.request for chunk in plan.prefill)]
        for req in self._in_step:
            self._track(req)  # only a request added before this plugin was registered is new here
            self.collector.record_request_scheduled(req.req_id, plan.step_id)  # only the first counts

    def _update(self, req: Request, step: int | None) -> None:
        self.collector.update_request_progress(
            req.req_id, prefill_tokens=req.prefill_pos, decode_tokens=len(req.generated_tokens), step=step
        )

    def on_request_completion(self, request: Request) -> None:
        step = self._plan.step_id if self._plan is not None else None
        self._track(request)
        self._update(request, step)
        self.collector.finish_request(request.req_id, step=step)

    def after_step(self, stats: dict[str, Any]) -> None:
        # Preemptions are counted here, once the step has committed (a step that fails is planned again).
        if self._plan is not None:
            for req in self._plan.preempted:
                self.collector.record_preemption(req.req_id)
        pools = self._pools.values()
        used = sum(pool.num_used_blocks for pool in pools) if pools else None
        self.collector.record_step(**stats, kv_blocks_used=used)
        for req in self._in_step:
            if not req.finished:
                self._update(req, stats["step_id"])
        self._plan, self._in_step = None, []

    @property
    def num_blocks(self) -> int | None:
        """Blocks of the shared pool(s) the requests use; None when none does."""
        return sum(pool.num_blocks for pool in self._pools.values()) if self._pools else None

    def get_summary(self) -> dict[str, dict[str, Any]]:
        """``steps`` and ``requests`` (the collector's summaries) and ``run``: the run summary."""
        return {
            "steps": self.collector.get_step_summary(),
            "requests": self.collector.get_request_summary(),
            "run": self.collector.get_run_summary(self.num_blocks),
        }


# Storage types by bytes per value relative to float32: precision traded for memory.
_STORAGE_DTYPES = ((1.0, torch.float32), (0.5, torch.float16), (0.25, torch.float8_e4m3fn))


class CacheCompressionPlugin(CachePlugin):
    """Stores K/V rows in a narrower float type: ``compression_ratio`` = stored / original bytes.

    The ratio picks the widest type that meets it: >= 1.0 keeps float32, [0.5, 1) stores
    float16, [0.25, 0.5) float8 (e4m3). Attention upcasts the rows when it reads them, so
    the model is unchanged and only the cached values lose precision. Register it before
    requests are added: a cache fixes its storage type at its first append. A shared
    ``BlockPool`` stores its own dtype (create it with ``dtype=torch.float16`` to compress);
    ``report()`` counts the bytes the caches really hold.
    """

    options = ("compression_ratio",)

    def __init__(self, compression_ratio: float = 0.5) -> None:
        self.compression_ratio = 0.5
        self.configure({"compression_ratio": compression_ratio})
        self.bytes_original = 0
        self.bytes_stored = 0
        self.max_kv_error = 0.0  # largest |stored - original| over all K/V values

    def configure(self, config: Mapping[str, Any]) -> None:
        super().configure(config)
        ratio = config.get("compression_ratio", self.compression_ratio)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.25 <= ratio <= 1.0:
            raise ConfigurationError(
                f"compression_ratio must be a number in [0.25, 1.0] (float8 is the narrowest type), got {ratio!r}"
            )
        self.compression_ratio = float(ratio)
        self.storage_dtype = next(dtype for r, dtype in _STORAGE_DTYPES if r <= self.compression_ratio)

    def before_append(
        self, cache: BaseKVCache, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k_small, v_small = k_new.to(self.storage_dtype), v_new.to(self.storage_dtype)
        self.bytes_original += k_new.nbytes + v_new.nbytes
        error = max((k_small.to(k_new.dtype) - k_new).abs().max(), (v_small.to(v_new.dtype) - v_new).abs().max())
        self.max_kv_error = max(self.max_kv_error, float(error))
        return k_small, v_small

    def after_append(self, cache: BaseKVCache, num_rows: int, nbytes: int) -> None:
        # Count what the cache really holds: a shared pool keeps its own dtype whatever we hand it.
        self.bytes_stored += nbytes

    @property
    def bytes_saved(self) -> int:
        return self.bytes_original - self.bytes_stored

    @staticmethod
    def output_error(reference: Sequence[Request], compressed: Sequence[Request]) -> float:
        """Max |token difference| between an uncompressed run and a compressed run of the same requests."""
        ref = {r.req_id: r for r in reference}
        if sorted(ref) != sorted(r.req_id for r in compressed):
            raise ValidationError("compare runs of the same requests: the req_ids differ")
        worst = 0.0
        for req in compressed:
            for a, b in zip(ref[req.req_id].generated_tokens, req.generated_tokens, strict=True):
                worst = max(worst, float((a - b).abs().max()))
        return worst

    def report(self) -> dict[str, float]:
        ratio = self.bytes_stored / self.bytes_original if self.bytes_original else 1.0
        return {
            "bytes_original": float(self.bytes_original),
            "bytes_stored": float(self.bytes_stored),
            "bytes_saved": float(self.bytes_saved),
            "achieved_ratio": ratio,
            "max_kv_error": self.max_kv_error,
        }


class AttentionVisualizationPlugin(AttentionPlugin):
    """Keeps the first ``max_records`` attention matrices; ``save()`` writes them to ``save_dir``.

    Each record is ``(phase, weights [rows, keys])`` copied to the CPU. ``save()`` always
    writes ``.npy`` arrays and adds PNG heatmaps when matplotlib is installed.
    """

    options = ("save_dir", "max_records")

    def __init__(self, save_dir: str = "attention_viz", max_records: int = 64) -> None:
        self.records: list[tuple[str, np.ndarray[Any, np.dtype[np.float32]]]] = []
        self.save_dir, self.max_records = save_dir, 64
        self.configure({"save_dir": save_dir, "max_records": max_records})

    def configure(self, config: Mapping[str, Any]) -> None:
        super().configure(config)
        save_dir = config.get("save_dir", self.save_dir)
        max_records = config.get("max_records", self.max_records)
        if not isinstance(save_dir, str) or not save_dir:
            raise ConfigurationError(f"save_dir must be a non-empty str, got {save_dir!r}")
        check_int("max_records", max_records)
        self.save_dir, self.max_records = save_dir, max_records

    def on_attention(self, phase: str, weights: torch.Tensor) -> None:
        if len(self.records) < self.max_records:
            self.records.append((phase, weights.detach().to("cpu", torch.float32).numpy().copy()))

    def save(self) -> list[Path]:
        """Write every record; returns the paths written (``.npy`` and, with matplotlib, ``.png``)."""
        save_dir = Path(self.save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        has_matplotlib = importlib.util.find_spec("matplotlib") is not None
        paths: list[Path] = []
        for i, (phase, weights) in enumerate(self.records):
            stem = save_dir / f"attention_{i:03d}_{phase}"
            np.save(stem.with_suffix(".npy"), weights)
            paths.append(stem.with_suffix(".npy"))
            if has_matplotlib:
                paths.append(_save_heatmap(weights, stem.with_suffix(".png"), f"{phase} #{i}"))
        logger.info("wrote %d attention files to %s", len(paths), self.save_dir)
        return paths


def _save_heatmap(weights: np.ndarray[Any, np.dtype[np.float32]], path: Path, title: str) -> Path:
    # Figure + Agg canvas, not pyplot: no global backend switch inside a notebook.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_title(title)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    fig.savefig(path)
    return path
