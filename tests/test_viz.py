"""cb_lab.viz: ASCII pictures agree with the trace's numbers; PNGs are written when matplotlib is there."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
from helpers import make_model, make_request

from cb_lab import viz
from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.scheduler import Scheduler
from cb_lab.monitoring.trace import StepTrace, TracePlugin
from cb_lab.plugins.base import PluginManager
from cb_lab.workload import run_workload

DIM = 8


def trace_of(policy: str = "decode_first", shared_pool: bool = False) -> list[StepTrace]:
    """Five requests arriving over four steps, budget 6, chunk 3 (a pool of 12 blocks of 2 when shared)."""
    trace = TracePlugin(budget=6)
    manager = PluginManager()
    manager.register_scheduler_plugin(trace)
    sched = Scheduler(make_model(DIM), 6, 3, plugins=manager, policy=policy)
    pool = BlockPool(12, 2, DIM) if shared_pool else None
    shapes = [(0, 5, 3), (0, 2, 6), (1, 7, 1), (3, 3, 4), (3, 1, 2)]  # (arrival, prompt_len, max_new_tokens)
    arrivals = [
        (t, make_request(f"q{i}", L, n, DIM, PagedKVCache(2, pool=pool) if pool else "dense"))
        for i, (t, L, n) in enumerate(shapes)
    ]
    run_workload(sched, arrivals)
    return trace.steps


def bars(text: str) -> list[str]:
    """What lies between the | | of each row."""
    return [line.split("|")[1] for line in text.splitlines() if line.count("|") == 2]


def test_timeline_rows_are_the_request_timeline_under_a_ruler() -> None:
    steps = trace_of()
    text = viz.timeline(steps)
    lines = text.splitlines()
    rows = bars(text)
    assert len(rows) == 5 and all(len(r) == len(steps) for r in rows)
    assert lines[2].strip() == "".join(str(s.step_id % 10) for s in steps)  # the units ruler
    assert lines[3].startswith("q0 ") and lines[3].index("|") + 1 == lines[2].index("0")  # columns line up
    joined = "".join(rows)
    assert joined.count("D") == sum(s.decode_tokens for s in steps)  # one decode token per D
    assert joined.count("P") == sum(len(s.prefill) for s in steps)  # one chunk per P
    assert joined.count("P") > 5  # chunking really split some prompts


def test_batch_composition_counts_every_token_of_the_budget() -> None:
    steps = trace_of()
    rows = bars(viz.batch_composition(steps))
    assert len(rows) == len(steps)
    for row, s in zip(rows, steps, strict=True):
        assert row.count("D") == s.decode_tokens and row.count("P") == s.prefill_tokens
        assert row.count(".") == 6 - s.tokens_used and len(row) == 6
    assert "".join(rows).count("D") + "".join(rows).count("P") == sum(s.tokens_used for s in steps)


def test_batch_composition_draws_static_padding() -> None:
    steps = trace_of("static")
    rows = bars(viz.batch_composition(steps))
    padding = [s.padding_tokens for s in steps]
    assert sum(padding) > 0
    assert [row.count("#") for row in rows] == padding
    assert all(len(row) == max(6, s.tokens_used + s.padding_tokens) for row, s in zip(rows, steps))


def test_pool_occupancy_bars_are_the_used_blocks() -> None:
    steps = trace_of(shared_pool=True)
    rows = bars(viz.pool_occupancy(steps))
    assert [row.count("#") for row in rows] == [s.pool_used_blocks for s in steps]
    assert all(len(row) == 12 for row in rows) and max(s.pool_used_blocks or 0 for s in steps) > 0
    scaled = bars(viz.pool_occupancy(steps, width=6))  # 2 blocks per character
    assert [row.count("#") for row in scaled] == [round((s.pool_used_blocks or 0) / 2) for s in steps]
    assert "no shared block pool" in viz.pool_occupancy(trace_of())


def test_empty_trace_draws_a_note() -> None:
    for draw in (viz.timeline, viz.batch_composition, viz.pool_occupancy):
        assert draw([]) == "(no steps recorded)"


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
@pytest.mark.parametrize("shared_pool", [False, True])
def test_save_pngs_writes_three_nonempty_pngs(tmp_path: Path, shared_pool: bool) -> None:
    paths = viz.save_pngs(trace_of(shared_pool=shared_pool), tmp_path / "plots")
    assert [p.name for p in paths] == ["timeline.png", "batch_composition.png", "pool_occupancy.png"]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_save_pngs_without_matplotlib_returns_nothing_and_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with caplog.at_level(logging.WARNING, logger="cb_lab.viz"):
        assert viz.save_pngs(trace_of(), tmp_path) == []
    assert "matplotlib is not installed" in caplog.text and not any(tmp_path.iterdir())


def test_overview_cuts_the_pictures_to_a_terminal() -> None:
    steps = trace_of(shared_pool=True)
    text = viz.overview(steps, max_steps=4, max_requests=2, rows=3, width=4)
    assert text.startswith(f"the first 4 of {len(steps)} steps\n")
    timeline_rows = [line for line in text.splitlines() if line.startswith("q")]
    assert [row.split()[0] for row in timeline_rows] == ["q0", "q1"]
    assert all(len(bars(r)[0]) == 4 for r in timeline_rows)
    assert "... and 3 more requests" in text
    sampled = [steps[0], steps[round((len(steps) - 1) / 2)], steps[-1]]  # 3 rows, evenly spaced, the last included
    composition = [line for line in text.splitlines() if line.startswith("step ") and "/6" in line]
    assert [int(line.split()[1]) for line in composition] == [s.step_id for s in sampled]
    for line, s in zip(composition, sampled):
        bar = bars(line)[0]
        assert len(bar) <= 4 and ("D" in bar) == (s.decode_tokens > 0) and ("P" in bar) == (s.prefill_tokens > 0)
    assert f"(3 of {len(steps)} steps, evenly spaced)" in text and "KV pool occupancy" in text
    assert "KV pool occupancy" not in viz.overview(trace_of())  # dense caches: no pool to draw
    assert viz.overview([]) == "(no steps recorded)"


def test_block_tables_star_the_blocks_two_requests_share() -> None:
    trace = TracePlugin()
    manager = PluginManager()
    manager.register_scheduler_plugin(trace)
    pool = BlockPool(16, 2, DIM)
    sched = Scheduler(make_model(DIM), 8, 8, plugins=manager)
    sched.add_request(make_request("a", 4, 4, DIM, PagedKVCache(2, pool=pool)))
    sched.step()
    sched.fork("a", "b")  # b holds a's rows 0..2: both blocks, the second partial for b
    sched.step()
    last = trace.steps[-1]
    a, b = dict(last.block_tables)["a"], dict(last.block_tables)["b"]
    text = viz.block_tables(last)
    rows = {line.split()[0]: line.split("[", 1)[1].rstrip("]").split() for line in text.splitlines()[1:]}
    assert rows == {"a": [f"{x}*" if x in b else str(x) for x in a], "b": [f"{x}*" if x in a else str(x) for x in b]}
    assert sum(x in b for x in a) == 1 and last.kv_copies == 1  # b's write of row 3 copied the partial block
    assert "no paged block table" in viz.block_tables(trace_of()[0])
