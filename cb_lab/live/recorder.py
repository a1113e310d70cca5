"""``LiveTracePlugin``: the per-step trace, as one small JSON object per step, for the live page.

It is a :class:`~cb_lab.monitoring.trace.TracePlugin` (the same ``StepTrace`` per step, built
from the same hooks) that keeps no list: each step is encoded once, on the engine thread,
and published to a :class:`~cb_lab.live.hub.StepHub`, which keeps a bounded window of them (a
server runs for days) and hands them to the pages that watch. An event is
``StepTrace.to_dict()`` (so a saved window is a trace file ``load_trace`` reads) plus what only
the live pool can tell::

    {"step_id": 41, "decode": ["r3", "r7"], "prefill": [["r9", 32, 32]], "skipped": [["r11", "no_blocks"]],
     "waiting": ["r11"], "running": ["r3", "r7", "r9"], "block_tables": [["r3", [0, 4]], ...],
     "pool_used_blocks": 9, "pool_num_blocks": 64, "duration_s": 0.0021, ...,   # the StepTrace
     "t": 12.504,                  # seconds since the plugin was made (the page's clock for rates)
     "pool_cached_blocks": 5,      # evictable prefix-cache blocks (rows kept, nobody holds them)
     "blocks": "uus.cc....",       # one character per block: u in use, s shared, c cached, . free
     "cached_ids": None}           # over MAX_GRID_BLOCKS ("blocks" None): the cached blocks' ids, else None

``Scheduler.abort`` (a client hung up) frees blocks between steps, and an idle engine may run no
step for minutes: so each abort also publishes the state after it (:func:`abort_event`), which
the hub sends as its own kind of message (it is no step, and no trace file holds it)::

    {"after_step": 41,             # the last step published before the abort
     "aborted": ["r3", "r7"],      # every request aborted since that step (the next step lists them too)
     "waiting": [], "running": ["r9"], "pool_used_blocks": 3, "pool_num_blocks": 64,
     "t": 13.2, "pool_cached_blocks": 5, "blocks": "uuu.cc...."}
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.request import Request
from cb_lab.live.hub import StepHub
from cb_lab.monitoring.trace import StepTrace, TracePlugin

__all__ = ["BLOCK_CHARS", "MAX_GRID_BLOCKS", "LiveTracePlugin", "abort_event", "cached_block_ids", "pool_blocks",
           "step_event"]

BLOCK_CHARS = {"u": "in use (one block table)", "s": "shared (two or more block tables)",
               "c": "cached, evictable (no table holds it; its rows wait for a prefix hit)", ".": "free"}
MAX_GRID_BLOCKS = 4096  # a larger pool is sent as counts only: a grid that big says nothing more
_STEP_FIELDS = tuple(f.name for f in dataclasses.fields(StepTrace))


def pool_blocks(pools: Sequence[BlockPool]) -> str | None:
    """One :data:`BLOCK_CHARS` character per block of ``pools`` (one after the other); None without a
    pool or over :data:`MAX_GRID_BLOCKS` blocks."""
    if not pools or sum(p.num_blocks for p in pools) > MAX_GRID_BLOCKS:
        return None
    text = []
    for pool in pools:
        chars = ["s" if n > 1 else "u" if n else "." for n in pool.ref_counts]
        for block_id in pool.evictable:
            chars[block_id] = "c"
        text += chars
    return "".join(text)


def cached_block_ids(pools: Sequence[BlockPool]) -> list[int] | None:
    """The evictable blocks of a pool too large for :func:`pool_blocks` (ids counted across ``pools``, one
    after the other), so that its aggregated grid can still show them; None when the grid is sent, or
    when they are too many (over :data:`MAX_GRID_BLOCKS`)."""
    if not pools or sum(p.num_blocks for p in pools) <= MAX_GRID_BLOCKS:
        return None
    if sum(p.num_evictable_blocks for p in pools) > MAX_GRID_BLOCKS:
        return None
    ids, offset = [], 0
    for pool in pools:
        ids += sorted(offset + block_id for block_id in pool.evictable)
        offset += pool.num_blocks
    return ids


def step_event(step: StepTrace, pools: Sequence[BlockPool], t: float) -> dict[str, Any]:
    """What the page gets for one step: the ``StepTrace``'s fields, the clock and the pool's blocks.

    The fields are taken as they are (tuples, which JSON writes as lists, so the text equals
    that of ``step.to_dict()``): ``asdict``'s deep copy cost a millisecond a step with 200
    requests running, on the engine thread.
    """
    fields = {name: getattr(step, name) for name in _STEP_FIELDS}
    return fields | _live_fields(pools, t)


def _live_fields(pools: Sequence[BlockPool], t: float) -> dict[str, Any]:
    cached = sum(p.num_evictable_blocks for p in pools) if pools else None
    return {"t": round(t, 4), "pool_cached_blocks": cached, "blocks": pool_blocks(pools),
            "cached_ids": cached_block_ids(pools)}


def abort_event(after_step: int | None, aborted: Sequence[str], waiting: Sequence[str], running: Sequence[str],
                pools: Sequence[BlockPool], t: float) -> dict[str, Any]:
    """What the page gets when requests are aborted between steps: who, and the queues and pool now."""
    return {"after_step": after_step, "aborted": list(aborted), "waiting": list(waiting), "running": list(running),
            "pool_used_blocks": sum(p.num_used_blocks for p in pools) if pools else None,
            "pool_num_blocks": sum(p.num_blocks for p in pools) if pools else None} | _live_fields(pools, t)


class LiveTracePlugin(TracePlugin):
    """Publishes every step to ``hub`` as compact JSON (:func:`step_event`); keeps no steps itself.

    Register it like any scheduler plugin (``engine.scheduler.plugins.register_scheduler_plugin``);
    its work runs on the thread that steps the scheduler and never waits for a page.
    """

    def __init__(self, hub: StepHub, budget: int | None = None) -> None:
        super().__init__(budget)
        self.hub = hub
        self._start = time.monotonic()
        self._last_step: int | None = None

    def record(self, step: StepTrace) -> None:
        self._last_step = step.step_id
        event = step_event(step, self.pools, time.monotonic() - self._start)
        self.hub.publish(step.step_id, json.dumps(event, separators=(",", ":")))

    def on_request_aborted(self, request: Request) -> None:
        super().on_request_aborted(request)
        event = abort_event(self._last_step, self._aborted, self._waiting, self._running, self.pools,
                            time.monotonic() - self._start)
        self.hub.publish_abort(json.dumps(event, separators=(",", ":")))
