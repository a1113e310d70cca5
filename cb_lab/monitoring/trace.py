"""The per-step trace as data: what every step ran, who waited, who was preempted, and why.

:class:`TracePlugin` records one :class:`StepTrace` per completed step, from the scheduler
hooks alone (it never reads the scheduler object). Everything else is derived from
``plugin.steps``: the per-request timeline below, the pictures in :mod:`cb_lab.viz`, and
JSON files that reload as equal objects::

    trace = TracePlugin()
    manager.register_scheduler_plugin(trace)
    ...run...
    trace.request_timeline()["r001"]   # ['.', '.', 'P', 'P', 'D', 'x', '.', 'P', 'D', ' ']

Timeline characters, one per step: ``' '`` not arrived yet (or finished), ``'.'`` waiting,
``'P'`` ran a prefill chunk, ``'D'`` ran a decode, ``'-'`` running but skipped this step,
``'x'`` preempted in this step (its K/V is gone; it waits again from the next step).

Idle steps (nothing active) call no hook and do not advance ``step_id``: they leave no trace.
``Scheduler.abort`` (a server's client hung up) calls ``on_request_aborted``: the request leaves the
rebuilt queues at once, and the next step's trace lists the requests aborted since the step before
in ``aborted``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.exceptions import ValidationError
from cb_lab.plugins.base import SchedulerPlugin

if TYPE_CHECKING:
    from cb_lab.core.block_pool import BlockPool
    from cb_lab.core.plan import StepPlan
    from cb_lab.core.request import Request

logger = logging.getLogger(__name__)

__all__ = ["TIMELINE_CHARS", "TRACE_FORMAT", "StepTrace", "TracePlugin", "load_trace", "request_timeline"]

TIMELINE_CHARS = {" ": "not arrived / finished", ".": "waiting", "P": "prefill chunk", "D": "decode",
                  "-": "running, skipped", "x": "preempted"}
TRACE_FORMAT = "cb_lab.trace/1"  # the "format" of a trace file


@dataclass(frozen=True, slots=True)
class StepTrace:
    """One step. Queues and block tables are as they are *after* the step."""

    step_id: int
    budget: int | None  # max_tokens_per_step (None when neither the stats nor TracePlugin(budget=) give it)
    decode: tuple[str, ...]
    prefill: tuple[tuple[str, int, int], ...]  # (req_id, start, length)
    admitted: tuple[str, ...]
    preempted: tuple[str, ...]
    finished: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]  # (req_id, reason: budget, no_blocks, max_num_seqs, batch_running)
    waiting: tuple[str, ...]  # queue order: the head is admitted first
    running: tuple[str, ...]  # arrival order: the last is preempted first
    block_tables: tuple[tuple[str, tuple[int, ...]], ...]  # paged caches of the requests that ran
    pool_used_blocks: int | None  # of the shared pool(s); None when no request uses one
    pool_num_blocks: int | None
    padding_tokens: int  # static batching: slots of finished requests in a running batch
    duration_s: float
    arrived: tuple[str, ...] = ()  # added while step_id == this step (before it ran)
    prefix_hits: tuple[tuple[str, int], ...] = ()  # (req_id, prefill rows taken from cached blocks) of admissions
    kv_evictions: int = 0  # cached blocks evicted in the step
    kv_copies: int = 0  # copy-on-write copies made in the step
    aborted: tuple[str, ...] = ()  # removed by Scheduler.abort since the step before (gone from the queues)
    first_tokens: tuple[str, ...] = ()  # requests whose first generated token came out of this step (their TTFT)

    @property
    def decode_tokens(self) -> int:
        return len(self.decode)

    @property
    def prefill_tokens(self) -> int:
        return sum(length for _, _, length in self.prefill)

    @property
    def tokens_used(self) -> int:
        return self.decode_tokens + self.prefill_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepTrace:
        """Inverse of :meth:`to_dict`, also after a JSON round trip (lists back to tuples)."""
        return cls(
            step_id=data["step_id"], budget=data["budget"], decode=tuple(data["decode"]),
            prefill=tuple((r, s, n) for r, s, n in data["prefill"]), admitted=tuple(data["admitted"]),
            preempted=tuple(data["preempted"]), finished=tuple(data["finished"]),
            skipped=tuple((r, why) for r, why in data["skipped"]), waiting=tuple(data["waiting"]),
            running=tuple(data["running"]),
            block_tables=tuple((r, tuple(table)) for r, table in data["block_tables"]),
            pool_used_blocks=data["pool_used_blocks"], pool_num_blocks=data["pool_num_blocks"],
            padding_tokens=data["padding_tokens"], duration_s=data["duration_s"], arrived=tuple(data["arrived"]),
            prefix_hits=tuple((r, n) for r, n in data.get("prefix_hits", ())),
            kv_evictions=data.get("kv_evictions", 0), kv_copies=data.get("kv_copies", 0),
            aborted=tuple(data.get("aborted", ())), first_tokens=tuple(data.get("first_tokens", ())),
        )


def request_timeline(steps: Sequence[StepTrace]) -> dict[str, list[str]]:
    """One character per step for every request in the trace (first arrival first)."""
    order: dict[str, None] = {}
    for s in steps:
        order.update(dict.fromkeys((*s.arrived, *s.waiting, *s.running, *s.preempted, *s.finished)))
    rows: dict[str, list[str]] = {req_id: [] for req_id in order}
    for s in steps:
        marks = {req_id: "." for req_id in (*s.waiting, *s.finished)}  # a zero-token request finishes waiting
        marks.update(dict.fromkeys(s.running, "-"))
        marks.update(dict.fromkeys(s.decode, "D"))
        marks.update({req_id: "P" for req_id, _, _ in s.prefill})
        marks.update(dict.fromkeys(s.preempted, "x"))
        for req_id, row in rows.items():
            row.append(marks.get(req_id, " "))
    return rows


def load_trace(path: str | Path) -> list[StepTrace]:
    """Read a file written by :meth:`TracePlugin.to_json`."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("format") != TRACE_FORMAT:
        raise ValidationError(f"{path} is not a cb-lab trace (format {TRACE_FORMAT!r}); write one with "
                              "TracePlugin.to_json")
    return [StepTrace.from_dict(step) for step in data["steps"]]


class TracePlugin(SchedulerPlugin):
    """Records a :class:`StepTrace` per step in ``self.steps``.

    The waiting and running queues are rebuilt from the events (added, admitted,
    preempted, finished) exactly as the scheduler's commit changes them. ``budget`` is
    used when the step stats carry no ``max_tokens_per_step``.
    """

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget
        self.steps: list[StepTrace] = []
        self._waiting: list[str] = []
        self._running: list[str] = []
        self._arrived: list[str] = []
        self._pools: dict[int, BlockPool] = {}  # shared pools of the requests seen, by id
        self._plan: StepPlan | None = None
        self._finished: list[str] = []
        self._forked: list[str] = []
        self._aborted: list[str] = []
        # Requests that have produced a token, until they finish: a preempted one recomputes its
        # prefill and ends it again, but its first token came out long before.
        self._has_token: set[str] = set()

    def _watch_pool(self, request: Request) -> None:
        pool = request.kv_cache.shared_pool
        if pool is not None:
            self._pools.setdefault(id(pool), pool)

    def on_request_added(self, request: Request, step_id: int) -> None:
        if request.parent_id is None:
            self._waiting.append(request.req_id)
        elif self._plan is None:  # Scheduler.fork between steps: it holds its parent's blocks and runs at once
            self._running.append(request.req_id)
        else:  # a sample forked by this step's commit: it joins running after the step's admissions
            self._forked.append(request.req_id)
        self._arrived.append(request.req_id)
        self._watch_pool(request)

    def before_step(self, plan: StepPlan) -> None:
        self._plan, self._finished = plan, []  # a step that failed in compute is simply planned again

    def on_request_aborted(self, request: Request) -> None:
        req_id = request.req_id
        self._waiting = [r for r in self._waiting if r != req_id]
        self._running = [r for r in self._running if r != req_id]
        self._aborted.append(req_id)
        self._has_token.discard(req_id)

    def on_request_completion(self, request: Request) -> None:
        self._finished.append(request.req_id)

    def after_step(self, stats: dict[str, Any]) -> None:
        plan = self._plan
        assert plan is not None and plan.step_id == stats["step_id"], "after_step without its before_step"
        for req in plan.preempted:  # the same order as Scheduler.commit
            self._running.remove(req.req_id)
            self._waiting.insert(0, req.req_id)
        for req in plan.admitted:
            self._waiting.remove(req.req_id)
            self._running.append(req.req_id)
        self._running += self._forked
        done = set(self._finished)
        self._waiting = [r for r in self._waiting if r not in done]
        self._running = [r for r in self._running if r not in done]
        first_tokens = self._first_tokens(plan)
        for req_id in done:
            self._has_token.discard(req_id)
        ran = [*plan.decode, *(chunk.request for chunk in plan.prefill)]
        for req in ran:
            self._watch_pool(req)
        pools = list(self._pools.values())
        self.record(StepTrace(
            step_id=plan.step_id,
            budget=stats.get("max_tokens_per_step", self.budget),
            decode=tuple(r.req_id for r in plan.decode),
            prefill=tuple((c.request.req_id, c.start, c.length) for c in plan.prefill),
            admitted=tuple(r.req_id for r in plan.admitted),
            preempted=tuple(r.req_id for r in plan.preempted),
            finished=tuple(self._finished),
            skipped=plan.skipped,
            waiting=tuple(self._waiting),
            running=tuple(self._running),
            block_tables=tuple(
                (r.req_id, tuple(r.kv_cache.block_table)) for r in ran if isinstance(r.kv_cache, PagedKVCache)
            ),
            pool_used_blocks=sum(p.num_used_blocks for p in pools) if pools else None,
            pool_num_blocks=sum(p.num_blocks for p in pools) if pools else None,
            padding_tokens=stats.get("padding_tokens", 0),
            duration_s=stats["step_duration"],
            arrived=tuple(self._arrived),
            prefix_hits=tuple((c.request.req_id, c.start) for c in plan.prefill if c.cached_blocks),
            kv_evictions=stats.get("kv_evictions", 0),
            kv_copies=stats.get("kv_copies", 0),
            aborted=tuple(self._aborted),
            first_tokens=first_tokens,
        ))
        self._plan, self._finished, self._arrived, self._forked, self._aborted = None, [], [], [], []

    def _first_tokens(self, plan: StepPlan) -> tuple[str, ...]:
        """The requests of ``plan`` that produced their first token: a decode, or a prefill chunk that
        reached the end of what it prefills (the output at the last row is a token)."""
        produced = [*plan.decode, *(c.request for c in plan.prefill if c.start + c.length == c.request.prefill_len)]
        first = tuple(r.req_id for r in produced if r.req_id not in self._has_token)
        self._has_token.update(first)
        return first

    def record(self, step: StepTrace) -> None:
        """Keep one finished step (here: append it to ``steps``)."""
        self.steps.append(step)

    @property
    def pools(self) -> list[BlockPool]:
        """The shared block pools of the requests seen so far (usually one)."""
        return list(self._pools.values())

    def request_timeline(self) -> dict[str, list[str]]:
        """Per request, one character per recorded step (see the module docstring)."""
        return request_timeline(self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {"format": TRACE_FORMAT, "steps": [s.to_dict() for s in self.steps]}

    def to_json(self, path: str | Path | None = None) -> str:
        """The trace as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict())
        if path is not None:
            Path(path).write_text(text)
            logger.info("wrote a %d-step trace to %s", len(self.steps), path)
        return text

    @staticmethod
    def load_json(path: str | Path) -> list[StepTrace]:
        """The steps of a trace file; equal to the ``steps`` that wrote it."""
        return load_trace(path)
