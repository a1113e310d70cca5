"""What the live page's tests share: the scheduler's own plans as the reference, a reader of
server-sent events, and hand-made trace files for the page to replay."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cb_lab.core.plan import StepPlan
from cb_lab.monitoring.trace import TRACE_FORMAT, StepTrace
from cb_lab.plugins.base import SchedulerPlugin


class PlanLog(SchedulerPlugin):
    """The scheduler's own plans, the reference the events are compared with."""

    def __init__(self) -> None:
        self.plans: list[StepPlan] = []

    def before_step(self, plan: StepPlan) -> None:
        self.plans.append(plan)


def assert_events_are_the_plans(events: list[dict[str, Any]], plans: list[StepPlan]) -> None:
    assert [e["step_id"] for e in events] == [p.step_id for p in plans]
    for e, plan in zip(events, plans):
        assert e["decode"] == [r.req_id for r in plan.decode]
        assert e["prefill"] == [[c.request.req_id, c.start, c.length] for c in plan.prefill]
        assert e["admitted"] == [r.req_id for r in plan.admitted]
        assert e["preempted"] == [r.req_id for r in plan.preempted]
        assert e["skipped"] == [list(pair) for pair in plan.skipped]


def assert_pool_adds_up(e: dict[str, Any]) -> None:
    blocks = e["blocks"]
    assert len(blocks) == e["pool_num_blocks"]
    assert blocks.count("u") + blocks.count("s") == e["pool_used_blocks"]
    assert blocks.count("c") == e["pool_cached_blocks"]
    shared = {b for _, table in e["block_tables"] for b in table if sum(b in t for _, t in e["block_tables"]) > 1}
    assert shared <= {i for i, c in enumerate(blocks) if c == "s"}


def sse(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Server-sent events as dicts of their fields (comments skipped)."""
    message: dict[str, str] = {}
    for line in lines:
        if not line and message:
            yield message
            message = {}
        elif line and not line.startswith(":"):
            key, _, value = line.partition(": ")
            message[key] = value


def trace_step(step_id: int, **fields: Any) -> dict[str, Any]:
    """One step of a trace file as the page reads it: every field empty (no pool) unless given."""
    empty = StepTrace(step_id=step_id, budget=32, decode=(), prefill=(), admitted=(), preempted=(), finished=(),
                      skipped=(), waiting=(), running=(), block_tables=(), pool_used_blocks=None,
                      pool_num_blocks=None, padding_tokens=0, duration_s=0.001)
    return empty.to_dict() | fields


def trace_file(path: Path, steps: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"format": TRACE_FORMAT, "steps": steps}))
    return path
