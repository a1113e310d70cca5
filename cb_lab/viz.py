"""Pictures of a run, drawn from its trace (``TracePlugin().steps``): ASCII strings and PNGs.

Three views of the same steps, each one idea of continuous batching:

- :func:`timeline`: one row per request, one column per step. Requests wait (``.``),
  prefill (``P``) and decode (``D``) side by side; preemption (``x``) sends one back.
- :func:`batch_composition`: one row per step, one character per token of the budget:
  ``D`` decode, ``P`` prefill, ``#`` padding (static batching), ``.`` unused budget.
- :func:`pool_occupancy`: one row per step, a bar of the shared KV pool's used blocks.
- :func:`block_tables`: one step's block tables, blocks held by two or more tables starred
  (prefix caching and forks share blocks).

:func:`overview` puts the three together, cut to a terminal (``python -m cb_lab simulate``).

The functions return strings and print nothing; :func:`pngs` draws the same three with
matplotlib when it is installed (``pip install cb-lab[viz]``), and :func:`save_pngs` writes them.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeVar

from cb_lab.monitoring.metrics import StepMetrics
from cb_lab.monitoring.trace import TIMELINE_CHARS, StepTrace, request_timeline

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

__all__ = [
    "batch_composition", "block_tables", "metrics_pngs", "overview", "pngs", "pool_occupancy", "save_pngs", "timeline",
]

_NO_STEPS = "(no steps recorded)"
_T = TypeVar("_T")


def _ruler(step_ids: Sequence[int]) -> tuple[str, str]:
    """The tens digit where a decade starts, and every step's units digit."""
    tens = "".join(str(s // 10 % 10) if s % 10 == 0 else " " for s in step_ids)
    return tens, "".join(str(s % 10) for s in step_ids)


def timeline(trace_steps: Sequence[StepTrace]) -> str:
    """One row per request, one character per step (``request_timeline``), under a step ruler."""
    if not trace_steps:
        return _NO_STEPS
    rows = request_timeline(trace_steps)
    width = max([len("step"), *map(len, rows)])
    legend = "  ".join(f"{c!r} {meaning}" for c, meaning in TIMELINE_CHARS.items())
    tens, units = _ruler([s.step_id for s in trace_steps])
    lines = [f"timeline: {legend}", f"{'step':<{width}}  {tens}".rstrip(), f"{'':<{width}}  {units}"]
    lines += [f"{req_id:<{width}} |{''.join(chars)}|" for req_id, chars in rows.items()]
    return "\n".join(lines)


def batch_composition(trace_steps: Sequence[StepTrace], width: int | None = None) -> str:
    """Per step, the budget's tokens: ``D`` decode, ``P`` prefill, ``#`` padding, ``.`` unused.

    Without a known budget (``StepTrace.budget`` is None) no ``.`` is drawn. A bar longer than
    ``width`` (None: no limit) is scaled to ``width`` characters, each run keeping at least one.
    """
    if not trace_steps:
        return _NO_STEPS
    digits = len(str(trace_steps[-1].step_id))
    lines = ["batch composition: D decode  P prefill  # padding (static batching)  . unused budget"]
    for s in trace_steps:
        used = s.tokens_used + s.padding_tokens
        unused = max(s.budget - used, 0) if s.budget is not None else 0
        runs = [("D", s.decode_tokens), ("P", s.prefill_tokens), ("#", s.padding_tokens), (".", unused)]
        bar = _bar([(c, n) for c, n in runs if n], width)
        budget = "?" if s.budget is None else str(s.budget)
        pad = f" +{s.padding_tokens} padding" if s.padding_tokens else ""
        lines.append(f"step {s.step_id:>{digits}} |{bar}| {s.tokens_used}/{budget}{pad}")
    return "\n".join(lines)


def pool_occupancy(trace_steps: Sequence[StepTrace], width: int = 40) -> str:
    """Per step, a bar of used (``#``) and free (``.``) blocks of the shared KV pool.

    One character per block when the pool has at most ``width`` blocks, else scaled to ``width``.
    """
    if not trace_steps:
        return _NO_STEPS
    if all(s.pool_num_blocks is None for s in trace_steps):
        return "KV pool occupancy: no shared block pool in this run (dense or private paged caches)"
    digits = len(str(trace_steps[-1].step_id))
    lines = ["KV pool occupancy: # used blocks  . free blocks (after each step)"]
    for s in trace_steps:
        used, total = s.pool_used_blocks or 0, s.pool_num_blocks or 0
        cells = min(total, width)
        filled = round(used * cells / total) if total else 0
        lines.append(f"step {s.step_id:>{digits}} |{'#' * filled}{'.' * (cells - filled)}| {used}/{total} blocks")
    return "\n".join(lines)


def block_tables(step: StepTrace, max_requests: int = 16) -> str:
    """The block tables of the requests that ran in ``step`` and hold blocks after it; ``*`` marks a
    block two or more of them share."""
    held = [(req_id, table) for req_id, table in step.block_tables if table]  # a finished request holds none
    tables = held[:max_requests]
    if not tables:
        return f"step {step.step_id}: no paged block table"
    holders: dict[int, int] = {}
    for _, table in held:
        for block in table:
            holders[block] = holders.get(block, 0) + 1
    width = max(len(r) for r, _ in tables)
    digits = max((len(str(b)) for _, t in tables for b in t), default=1)
    lines = [f"step {step.step_id} block tables: * shared by two or more requests"]
    for req_id, table in tables:
        cells = " ".join(f"{b:>{digits}}{'*' if holders[b] > 1 else ' '}" for b in table)
        lines.append(f"{req_id:<{width}} [{cells}]")
    if len(held) > max_requests:
        lines.append(f"... {len(held) - max_requests} more")
    return "\n".join(lines)


def _bar(runs: list[tuple[str, int]], width: int | None) -> str:
    """``(char, count)`` runs as one bar, scaled run by run to ``width`` characters when longer.

    Every run keeps at least one character (a single padding token stays visible).
    """
    total = sum(n for _, n in runs)
    if width is None or total <= width:
        return "".join(c * n for c, n in runs)
    exact = [n * width / total for _, n in runs]
    cells = [max(1, math.floor(x)) for x in exact]
    while sum(cells) < width:  # the rounding's spare cells go to the largest remainders
        cells[max(range(len(runs)), key=lambda i: exact[i] - cells[i])] += 1
    while sum(cells) > width:  # the minimum of one cell came from the widest run
        cells[max(range(len(runs)), key=lambda i: cells[i])] -= 1
    return "".join(c * k for (c, _), k in zip(runs, cells))


def _sample(steps: Sequence[StepTrace], rows: int) -> list[StepTrace]:
    if len(steps) <= rows:
        return list(steps)
    return [steps[round(i * (len(steps) - 1) / (rows - 1))] for i in range(rows)]


def overview(trace_steps: Sequence[StepTrace], *, max_steps: int = 80, max_requests: int = 16, rows: int = 20,
             width: int = 64) -> str:
    """The three pictures cut to a terminal: the timeline of the first steps and requests, then
    batch composition and pool occupancy for ``rows`` evenly spaced steps, bars at most ``width``."""
    if not trace_steps:
        return _NO_STEPS
    lines = timeline(trace_steps[:max_steps]).splitlines()
    shown = lines[: 3 + max_requests]
    if len(lines) > len(shown):
        shown.append(f"... and {len(lines) - len(shown)} more requests")
    parts = [f"the first {min(max_steps, len(trace_steps))} of {len(trace_steps):,} steps", "\n".join(shown)]
    sample = _sample(trace_steps, rows)
    note = "" if len(sample) == len(trace_steps) else f" ({len(sample)} of {len(trace_steps):,} steps, evenly spaced)"
    composition = batch_composition(sample, width).splitlines()
    parts.append(composition[0] + note + "\n" + "\n".join(composition[1:]))
    if any(s.pool_num_blocks is not None for s in trace_steps):
        occupancy = pool_occupancy(sample).splitlines()
        parts.append(occupancy[0] + note + "\n" + "\n".join(occupancy[1:]))
    return "\n\n".join(parts)


def pngs(trace_steps: Sequence[StepTrace]) -> dict[str, bytes]:
    """The three pictures as PNG bytes: ``timeline``, ``batch_composition``, ``pool_occupancy``.

    ``{}`` when matplotlib is not installed (a notebook then shows the ASCII :func:`overview`).
    """
    if importlib.util.find_spec("matplotlib") is None:
        return {}
    columns = _trace_columns(trace_steps)
    return {"timeline": _png(_timeline_png, trace_steps), "batch_composition": _png(_composition_png, columns),
            "pool_occupancy": _png(_pool_png, columns)}


def metrics_pngs(steps: Sequence[StepMetrics]) -> dict[str, bytes]:
    """``batch_composition`` and ``pool_occupancy`` from a ``MetricsCollector``'s steps, as PNG bytes.

    Step metrics have no per-request record, so there is no timeline; ``{}`` without matplotlib.
    """
    if importlib.util.find_spec("matplotlib") is None:
        return {}
    columns = _metrics_columns(steps)
    return {"batch_composition": _png(_composition_png, columns), "pool_occupancy": _png(_pool_png, columns)}


def _png(draw: Callable[[_T, IO[bytes]], None], data: _T) -> bytes:
    buffer = io.BytesIO()
    draw(data, buffer)
    return buffer.getvalue()


def save_pngs(trace_steps: Sequence[StepTrace], out_dir: str | Path) -> list[Path]:
    """Write ``timeline.png``, ``batch_composition.png`` and ``pool_occupancy.png`` to ``out_dir``.

    Returns the paths written; ``[]`` (and a log message) when matplotlib is not installed.
    """
    pictures = pngs(trace_steps)
    if not pictures:
        logger.warning("matplotlib is not installed: no PNGs written (pip install cb-lab[viz])")
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png" for name in pictures]
    for path, png in zip(paths, pictures.values()):
        path.write_bytes(png)
    logger.info("wrote %s", ", ".join(map(str, paths)))
    return paths


# --- matplotlib: Figure + Agg canvas, never pyplot (no global state, no backend switch) ------------

_COLORS = {" ": "white", ".": "#d9d9d9", "-": "#9e9e9e", "P": "#1f77b4", "D": "#2ca02c", "x": "#d62728"}


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _timeline_png(trace_steps: Sequence[StepTrace], out: IO[bytes]) -> None:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    rows = request_timeline(trace_steps)
    codes = list(_COLORS)
    grid = [[codes.index(c) for c in chars] for chars in rows.values()] or [[0]]
    fig, ax = _figure(min(4 + 0.15 * len(trace_steps), 20), min(1.5 + 0.3 * len(rows), 12))
    ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=ListedColormap(list(_COLORS.values())),
              vmin=0, vmax=len(codes) - 1)
    ax.set_yticks(range(len(rows)), list(rows))
    ax.set_xlabel("step")
    ax.set_title("request timeline")
    handles = [Patch(color=_COLORS[c], label=TIMELINE_CHARS[c]) for c in codes if c != " "]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.savefig(out, format="png")


@dataclass(frozen=True, slots=True)
class _Columns:
    """Per-step numbers the composition and pool pictures draw, from a trace or from step metrics."""

    step_ids: list[int]
    decode: list[int]
    prefill: list[int]
    padding: list[int]
    budget: list[int | None]
    used_blocks: list[int | None]
    num_blocks: list[int | None]  # all None when the pool's size is not known (step metrics)


def _trace_columns(trace_steps: Sequence[StepTrace]) -> _Columns:
    s = trace_steps
    return _Columns([x.step_id for x in s], [x.decode_tokens for x in s], [x.prefill_tokens for x in s],
                    [x.padding_tokens for x in s], [x.budget for x in s], [x.pool_used_blocks for x in s],
                    [x.pool_num_blocks for x in s])


def _metrics_columns(steps: Sequence[StepMetrics]) -> _Columns:
    s = [x for x in steps if x.status == "completed"]
    return _Columns([x.step_id for x in s], [x.decode_tokens for x in s], [x.prefill_tokens for x in s],
                    [x.padding_tokens for x in s], [x.max_tokens_per_step for x in s], [x.kv_blocks_used for x in s],
                    [None] * len(s))


def _composition_png(c: _Columns, out: IO[bytes]) -> None:
    fig, ax = _figure(8, 4)
    ax.bar(c.step_ids, c.decode, width=1.0, color=_COLORS["D"], label="decode")
    ax.bar(c.step_ids, c.prefill, width=1.0, bottom=c.decode, color=_COLORS["P"], label="prefill")
    ax.bar(c.step_ids, c.padding, width=1.0, bottom=[d + p for d, p in zip(c.decode, c.prefill)], color="#ff7f0e",
           label="padding")
    if any(b is not None for b in c.budget):
        ax.step(c.step_ids, [b or 0 for b in c.budget], where="mid", color="black", label="budget")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens")
    ax.set_title("batch composition per step")
    ax.legend(fontsize="small")
    fig.savefig(out, format="png")


def _pool_png(c: _Columns, out: IO[bytes]) -> None:
    fig, ax = _figure(8, 3)
    if any(u is not None for u in c.used_blocks):
        ax.fill_between(c.step_ids, [u or 0 for u in c.used_blocks], step="mid", color=_COLORS["P"],
                        label="used blocks")
        if any(n is not None for n in c.num_blocks):
            ax.step(c.step_ids, [n or 0 for n in c.num_blocks], where="mid", color="black", label="pool size")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no shared KV block pool in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("KV blocks")
    ax.set_title("KV pool occupancy")
    fig.savefig(out, format="png")
