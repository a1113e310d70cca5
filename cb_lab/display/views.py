"""What each object shows in a notebook: one function per object, called by its ``_repr_html_``.

This module imports the objects it draws, so they cannot import it: it registers each view by
type in ``cb_lab.core.view_registry`` (the end of this file), where ``_repr_html_`` finds it
(the engine, above this layer, imports its views directly). Every view reads the object's state and draws it; none
changes anything. With matplotlib installed, a serving run also inlines its three plots.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cb_lab import viz
from cb_lab.core.batch_builder import RaggedBatch
from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import BaseKVCache, DenseKVCache, PagedKVCache
from cb_lab.core.plan import StepPlan, StepStats
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.core.view_registry import register_view
from cb_lab.display.markup import Cell, Raw, bar, card, escape, grid, image, request_colour, table
from cb_lab.monitoring.metrics import MetricsCollector
from cb_lab.sampling import SamplingParams
from cb_lab.serving import SUMMARY_KEYS, RunResult

if TYPE_CHECKING:  # the engine imports the Llama model and its loader: only its type is needed here
    from cb_lab.engine import LLMEngine

__all__ = [
    "block_pool_html", "block_tables_html", "config_html", "dense_cache_html", "engine_html", "engine_text", "fmt",
    "metrics_html", "paged_cache_html", "plan_html", "ragged_batch_html", "ragged_batch_text", "request_html",
    "run_html", "scheduler_html", "step_stats_html",
]

SHARED = "#f4a582"  # a block two or more block tables hold (prefix caching, forks)
EVICTABLE = "#fddbc7"  # cached, nobody holds it: kept until an allocation needs the room
IN_USE = "#92c5de"
MAX_GRID = 64  # a ragged batch's mask is drawn up to this many rows; a pool's blocks up to 16 x this


def fmt(value: object) -> str:
    """A figure as a person reads it: ``1,234``, ``0.125``, ``12.3``; None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _blocks(cache: BaseKVCache) -> str:
    return str(cache.block_table) if isinstance(cache, PagedKVCache) else "dense"


def request_html(req: Request) -> Raw:
    """A request: its phase, prefill progress, tokens generated, cache length and blocks."""
    figures = {"phase": req.phase, "cache_len": len(req.kv_cache), "blocks": _blocks(req.kv_cache)}
    if req.parent_id is not None:
        figures["forked from"] = req.parent_id
    if req.num_preemptions:
        figures["preemptions"] = req.num_preemptions
    rows = [["prefill", bar(req.prefill_pos, req.prefill_len)],
            ["generated", bar(len(req.generated_tokens), req.max_new_tokens, colour="#2ca02c")]]
    return card(f"Request {req.req_id!r}", [table(["", "progress"], rows, name="progress")], figures)


def _plan_rows(plan: StepPlan) -> list[list[object]]:
    """One row per request the plan touches: what it runs (or why it waits) and how many tokens."""
    rows: list[list[object]] = []
    for chunk in plan.prefill:
        why = "admitted" if chunk.request in plan.admitted else "continues its prompt"
        if chunk.cached_blocks:
            why += f", after {len(chunk.cached_blocks)} cached blocks (rows 0:{chunk.start})"
        if chunk.completes_prompt:
            why += "; ends its prompt: first token"
        rows.append([chunk.request.req_id, f"prefill {chunk.start}:{chunk.end}", chunk.length, why])
    for req in plan.decode:
        rows.append([req.req_id, "decode", 1, "running: one token per step"])
    for req in plan.preempted:
        rows.append([req.req_id, "preempted", 0, "its K/V is dropped; waits again, ahead of new requests"])
    for req_id, reason in plan.skipped:
        rows.append([req_id, "waits", 0, reason])
    return rows


def plan_html(plan: StepPlan) -> Raw:
    """A step plan: which request gets which tokens this step, and why the others wait."""
    title = f"step {plan.step_id}: {plan.total_tokens} tokens ({plan.num_decode_tokens} decode, " \
            f"{plan.num_prefill_tokens} prefill)"
    return card(title, [_plan_table(plan)])


def _plan_table(plan: StepPlan) -> Raw:
    return table(["request", "work", "tokens", "why"], _plan_rows(plan), name="plan")


STAT_FIGURES = ("decode_tokens", "prefill_tokens", "active_requests", "waiting_requests", "finished_requests",
                "preempted_requests", "padding_tokens", "prefix_hit_tokens", "kv_evictions", "kv_copies")


def step_stats_html(stats: StepStats) -> Raw:
    """A step's stats: its figures (non-zero counts, duration), then its plan when it ran one."""
    figures = {k: fmt(stats[k]) for k in STAT_FIGURES if stats.get(k)}
    figures["ms"] = fmt(1e3 * stats.get("step_duration", 0.0))
    parts: list[object] = [] if stats.plan is None else [_plan_table(stats.plan)]
    return card(f"step {stats.get('step_id')}: {stats.get('total_tokens')} tokens, {stats.get('status')}",
                parts, figures)


def ragged_batch_text(batch: RaggedBatch) -> str:
    """The batch as text: one line per request's rows, then the mask (``x`` may attend, ``.`` not)."""
    spans: dict[str, list[int]] = {}
    for m in batch.meta:
        spans.setdefault(m.req_id, []).append(m.pos_in_seq)
    parts = ", ".join(f"{r} pos {p[0]}..{p[-1]}" for r, p in spans.items())
    text = f"RaggedBatch({len(batch.meta)} rows, dim {batch.tokens.shape[-1]}{': ' + parts if parts else ''})"
    if not batch.meta or len(batch.meta) > MAX_GRID:
        return text
    labels = [f"{m.req_id}{m.pos_in_seq}" for m in batch.meta]
    width = max(map(len, labels))
    lines = [f"{'':<{width}}  " + " ".join(f"{i % 10}" for i in range(len(labels)))]
    lines += [f"{label:<{width}}  " + " ".join("x" if a else "." for a in row.tolist())
              for label, row in zip(labels, batch.mask)]
    return text + "\n" + "\n".join(lines)


def ragged_batch_html(batch: RaggedBatch) -> Raw:
    """The token table (request and position of every row) and the mask, one colour per request.

    A mask cell is coloured (and marked ``x``) where the query row may attend to the key
    row; masked cells are blank.
    """
    colours = {req_id: request_colour(i) for i, req_id in enumerate(dict.fromkeys(m.req_id for m in batch.meta))}
    tokens = grid([[Cell(m.req_id, colours[m.req_id], f"row {m.global_idx}") for m in batch.meta],
                   [Cell(m.pos_in_seq, colours[m.req_id]) for m in batch.meta]],
                  row_labels=["request", "position"], col_labels=range(len(batch.meta)), name="tokens")
    figures = {"rows": len(batch.meta), "requests": len(colours), "dim": batch.tokens.shape[-1]}
    if len(batch.meta) > MAX_GRID:
        return card("RaggedBatch", [f"(mask not drawn: more than {MAX_GRID} rows)"], figures)
    allowed = batch.mask.tolist()
    cells = [[Cell("x", colours[q.req_id], f"{q.req_id}{q.pos_in_seq} -> {k.req_id}{k.pos_in_seq}") if allowed[i][j]
              else Cell() for j, k in enumerate(batch.meta)] for i, q in enumerate(batch.meta)]
    labels = [f"{m.req_id} {m.pos_in_seq}" for m in batch.meta]
    mask = grid(cells, row_labels=labels, col_labels=range(len(batch.meta)), name="mask")
    return card("RaggedBatch", [tokens, "mask (rows: queries, columns: keys; x = may attend)", mask], figures)


def block_tables_html(tables: Mapping[str, Sequence[int]], ref_counts: Sequence[int], *, name: str = "blocks") -> Raw:
    """Block tables as a grid, one row per request, each cell a block id; shared blocks starred.

    A block is shared when ``ref_counts`` says two or more tables hold it (even tables not
    drawn here, such as a cached request's).
    """
    width = max((len(t) for t in tables.values()), default=0)
    rows = []
    for blocks in tables.values():
        cells = [Cell(f"{b}*", SHARED, f"shared by {ref_counts[b]}") if ref_counts[b] > 1
                 else Cell(b, IN_USE) for b in blocks]
        rows.append(cells + [Cell()] * (width - len(cells)))
    return grid(rows, row_labels=list(tables), col_labels=range(width), name=name)


def dense_cache_html(cache: DenseKVCache) -> Raw:
    figures = {"len": len(cache), "capacity": cache.capacity, "dim": cache.dim, "bytes": fmt(cache.nbytes)}
    return card("DenseKVCache", [bar(len(cache), cache.capacity)], figures)


def paged_cache_html(cache: PagedKVCache) -> Raw:
    """A paged cache: its block table (shared blocks starred) and its pool's free blocks."""
    figures = {"len": len(cache), "blocks": len(cache.block_table), "block_size": cache.block_size,
               "pool free blocks": cache.num_blocks_free, "shared pool": cache.shares_pool}
    refs = cache.pool.ref_counts if cache.pool is not None else []
    parts: list[object] = [block_tables_html({"block_table": cache.block_table}, refs)] if cache.block_table else []
    return card("PagedKVCache", parts, figures)


def block_pool_html(pool: BlockPool) -> Raw:
    """Every block of the pool: in use (its ref count), shared, cached and evictable, or free (blank)."""
    figures = {"used": pool.num_used_blocks, "evictable": pool.num_evictable_blocks,
               "free": len(pool.free_block_ids), "total": pool.num_blocks, "cached": len(pool.cached_blocks),
               "block_size": pool.block_size, "tokens": fmt(pool.num_tokens)}
    legend = "cells: block id; blue in use, orange * shared, pale orange cached and evictable, blank free"
    if pool.num_blocks > 16 * MAX_GRID:
        return card("BlockPool", [f"(blocks not drawn: more than {16 * MAX_GRID})"], figures)
    cells = [_pool_cell(pool, b) for b in range(pool.num_blocks)]
    rows = [cells[i : i + 16] for i in range(0, len(cells), 16)]
    return card("BlockPool", [legend, grid(rows, row_labels=[f"{i}-" for i in range(0, len(cells), 16)],
                                           name="pool")], figures)


def _pool_cell(pool: BlockPool, block: int) -> Cell:
    refs = pool.ref_counts[block]
    if refs > 1:
        return Cell(f"{block}*", SHARED, f"in use by {refs} block tables")
    if refs == 1:
        return Cell(block, IN_USE, "in use" + (", cached" if block in pool.block_hashes else ""))
    if block in pool.evictable:
        return Cell(block, EVICTABLE, "cached, evictable")
    return Cell("", None, f"block {block}: free")


def _request_rows(requests: Sequence[Request], state: str) -> list[list[object]]:
    return [[r.req_id, state, r.phase, bar(r.prefill_pos, r.prefill_len, width=80),
             f"{len(r.generated_tokens)}/{r.max_new_tokens}", len(r.kv_cache), _blocks(r.kv_cache)]
            for r in requests]


def scheduler_html(sched: Scheduler) -> Raw:
    """The scheduler: its budget, running and waiting requests, shared block tables, and its last step."""
    figures = {"step": sched.step_id, "policy": sched.policy, "budget": sched.max_tokens_per_step,
               "chunk": sched.prefill_chunk_size, "running": len(sched.running), "waiting": len(sched.waiting),
               "finished": sched.num_finished, "prefix caching": sched.enable_prefix_caching}
    rows = _request_rows(sched.running, "running") + _request_rows(list(sched.waiting), "waiting")
    parts: list[object] = [table(["request", "state", "phase", "prefill", "generated", "cache_len", "blocks"],
                                 rows, name="requests")]
    paged = {r.req_id: r.kv_cache for r in sched.running
             if isinstance(r.kv_cache, PagedKVCache) and r.kv_cache.block_table}
    pools = {id(cache.pool): cache.pool for cache in paged.values() if cache.pool is not None}
    if len(pools) == 1:  # one shared pool: the tables side by side show what is shared
        (pool,) = pools.values()
        tables = {req_id: cache.block_table for req_id, cache in paged.items()}
        parts += ["block tables (* shared)", block_tables_html(tables, pool.ref_counts)]
    if sched.last_step is not None:
        parts += ["last step", step_stats_html(sched.last_step)]
    return card("Scheduler", parts, figures)


def _summary_table(summary: Mapping[str, Any], keys: Sequence[str]) -> Raw:
    rows = [[k, fmt(summary[k])] for k in keys if k in summary]
    return Raw(f"<details><summary>all figures</summary>{table(['figure', 'value'], rows, name='summary')}"
               "</details>")


HEADLINE = ("steps", "tokens_per_step", "gen_tokens", "ttft_p50_steps", "ttft_p99_steps", "preemptions",
            "prefix_hit_rate")


def metrics_html(metrics: MetricsCollector) -> Raw:
    """A metrics collector: the run summary's headline figures, its steps' pictures (with matplotlib), every figure."""
    summary = metrics.get_run_summary()
    figures = {k: fmt(summary[k]) for k in HEADLINE}
    pictures = [image(png, name) for name, png in viz.metrics_pngs(metrics.steps).items()] if metrics.steps else []
    return card(f"MetricsCollector: {len(metrics.steps)} steps, {len(metrics.requests)} requests",
                [*pictures, _summary_table(summary, list(summary))], figures)


def run_html(result: RunResult) -> Raw:
    """A serving run: headline figures, its three pictures (PNG with matplotlib, else text), every figure."""
    figures = {k: fmt(result.summary.get(k)) for k in ("requests", "steps", "wall_s", *HEADLINE[1:])}
    pngs = viz.pngs(result.steps)
    pictures: list[object] = [image(png, name) for name, png in pngs.items()]
    if not pngs:
        pictures = [Raw(f"<pre>{escape(viz.overview(result.steps))}</pre>")]
    return card(f"RunResult {result.name!r}", [*pictures, _summary_table(result.summary, SUMMARY_KEYS)], figures)


def config_html(config: Any) -> Raw:
    """A config dataclass (``EngineConfig``, ``SamplingParams``): every field, its value and its default;
    the fields set away from their default in bold."""
    rows: list[list[object]] = []
    changed = 0
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        default = f.default if f.default is not dataclasses.MISSING else "-"
        changed += value != default
        rows.append([f.name, Raw(f"<b>{escape(value)}</b>") if value != default else value, default])
    return card(type(config).__name__, [table(["field", "value", "default"], rows, name="fields")],
                {"set": f"{changed} of {len(rows)} fields (bold)"})


def engine_text(engine: LLMEngine) -> str:
    """``LLMEngine(model ..., pool ..., running R, waiting W)``: the shape of the model and of its KV pool."""
    c, pool, sched = engine.model.model.config, engine.pool, engine.scheduler
    return (f"LLMEngine(model: {c.n_layers} layers, dim {c.dim}, {c.n_heads} heads / {c.n_kv_heads} KV heads, vocab "
            f"{c.vocab_size}, {str(engine.model.dtype).removeprefix('torch.')}; pool: {pool.num_blocks} blocks x "
            f"{pool.block_size} tokens, {pool.num_free_blocks} free; running {len(sched.running)}, waiting "
            f"{len(sched.waiting)})")


def engine_html(engine: LLMEngine) -> Raw:
    """An engine: the model's shape, the pool, the queues, then its scheduler and its config."""
    c, pool, sched = engine.model.model.config, engine.pool, engine.scheduler
    figures = {"layers": c.n_layers, "dim": c.dim, "heads": f"{c.n_heads} ({c.n_kv_heads} KV)",
               "vocab": fmt(c.vocab_size), "dtype": str(engine.model.dtype).removeprefix("torch."),
               "pool": f"{fmt(pool.num_blocks)} blocks x {pool.block_size} tokens ({fmt(pool.num_free_blocks)} free)",
               "running": len(sched.running), "waiting": len(sched.waiting)}
    return card("LLMEngine", [scheduler_html(sched), config_html(engine.config)], figures)


_VIEWS: list[tuple[type, Callable[[Any], str]]] = [
    (Request, request_html), (StepPlan, plan_html), (StepStats, step_stats_html), (RaggedBatch, ragged_batch_html),
    (DenseKVCache, dense_cache_html), (PagedKVCache, paged_cache_html), (BlockPool, block_pool_html),
    (Scheduler, scheduler_html), (MetricsCollector, metrics_html), (RunResult, run_html),
    (SamplingParams, config_html),
]
for _type, _view in _VIEWS:
    register_view(_type, _view)
register_view(RaggedBatch, ragged_batch_text, "text")
