"""Notebook displays: each ``_repr_html_`` draws the object's real state, and escapes what it prints.

The HTML is read back (``tests/html_tables.py``) and compared with the object: the mask grid
has exactly the cells the mask allows, the block grid each block id where the block table has
it, the plan table each request's tokens.
"""

from __future__ import annotations

import base64
import importlib.util
import json

import pytest
import torch

from cb_lab import viz
from cb_lab.core.batch_builder import RaggedBatch, build_ragged_batch
from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import DenseKVCache, PagedKVCache
from cb_lab.core.plan import StepStats
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.display.markup import Cell, Raw, bar, escape, image, request_colour
from cb_lab.display.views import HEADLINE, SHARED, fmt
from cb_lab.monitoring.metrics import MetricsCollector
from cb_lab.plugins.base import PluginManager
from cb_lab.plugins.builtin import MetricsPlugin
from cb_lab.serving import SUMMARY_KEYS, make_config, simulate
from cb_lab.workload import LengthDist, WorkloadConfig, generate_workload
from tests.helpers import make_model, make_request
from tests.html_tables import tables

SCRIPT = "<script>alert(1)</script>"


def shared_prefix_scheduler(budget: int = 16, ids: tuple[str, ...] = ("r0", "r1", "r2")) -> tuple[Scheduler, BlockPool]:
    """Three requests with an 8-row common prefix on one pool of 4-row blocks, prefix caching on."""
    pool = BlockPool(32, 4, 16)
    sched = Scheduler(make_model(), budget, 8, enable_prefix_caching=True)
    prefix = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    for i, req_id in enumerate(ids):
        own = torch.randn(3 + i, 16, generator=torch.Generator().manual_seed(10 + i))
        sched.add_request(Request(req_id, torch.cat([prefix, own]), 4, PagedKVCache(4, pool=pool)))
    return sched, pool


def test_markup_escapes_text_and_keeps_raw_html() -> None:
    assert escape(SCRIPT) == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert escape(Raw("<b>x</b>")) == "<b>x</b>"
    assert escape('"q" & \'s\'') == "&quot;q&quot; &amp; &#x27;s&#x27;"
    assert Cell(SCRIPT, None, SCRIPT).html() == (
        '<td style="border:1px solid #ccc;padding:1px 4px;text-align:center;min-width:1.6em" '
        'title="&lt;script&gt;alert(1)&lt;/script&gt;">&lt;script&gt;alert(1)&lt;/script&gt;</td>'
    )
    assert 'data-filled="30"' in bar(1, 4) and bar(1, 4).endswith(" 1/4")
    assert 'data-filled="120"' in bar(9, 4) and 'data-filled="120"' in bar(0, 0)  # clamped; nothing to do is done
    png = b"\x89PNG\r\n\x1a\nrest"
    assert base64.b64decode(image(png, "a").split("base64,")[1].split('"')[0]) == png
    assert request_colour(0) == request_colour(10) != request_colour(1)
    assert [fmt(v) for v in (None, 1234, 0.125, 12345.6, True, "x")] == ["-", "1,234", "0.125", "12,346", "True", "x"]


@pytest.mark.parametrize("chunks", [[(3, 0), (2, 5)], [(1, 0)], [(4, 2), (1, 7), (3, 0)]])
def test_the_mask_grid_has_exactly_the_cells_the_mask_allows(chunks: list[tuple[int, int]]) -> None:
    gen = torch.Generator().manual_seed(0)
    batch = build_ragged_batch([(f"q{i}", start, torch.randn(n, 4, generator=gen)) for i, (n, start) in
                                enumerate(chunks)])
    assert isinstance(batch, RaggedBatch) and isinstance(batch, tuple)
    tokens, meta, mask = batch  # still unpacks as the tuple it always was
    drawn = tables(batch._repr_html_())
    assert drawn["tokens"].texts() == [[m.req_id for m in meta], [str(m.pos_in_seq) for m in meta]]
    grid = drawn["mask"].cells()
    assert [[c.text == "x" for c in row] for row in grid] == mask.tolist()
    colours = {f"q{i}": request_colour(i) for i in range(len(chunks))}
    for i, row in enumerate(grid):
        for cell in row:  # an allowed cell has its query's request colour; a masked one none
            assert (f"background:{colours[meta[i].req_id]}" in cell.style) == (cell.text == "x")
    lines = repr(batch).splitlines()[2:]  # the text mask, one line per query row
    assert [line.split()[1:] for line in lines] == [["x" if a else "." for a in row] for row in mask.tolist()]


def test_a_request_shows_its_phase_progress_and_blocks() -> None:
    sched, _ = shared_prefix_scheduler()
    sched.step()
    req = sched.running[0]
    html = req._repr_html_()
    progress = tables(html)["progress"].texts()
    assert progress == [["prefill", f" {req.prefill_pos}/{req.prefill_len}"],
                        ["generated", f" {len(req.generated_tokens)}/{req.max_new_tokens}"]]
    assert f"phase <b>{req.phase}</b>" in html and f"cache_len <b>{len(req.kv_cache)}</b>" in html
    assert f"blocks <b>{req.kv_cache.block_table}</b>" in html  # type: ignore[attr-defined]
    assert req.phase == "prefill" and "prefill=8/11" in repr(req)
    sched.step()
    child = sched.fork("r0", "r0.fork")
    assert "forked from <b>r0</b>" in child._repr_html_() and "preemptions" not in child._repr_html_()
    child.preempt()
    assert "preemptions <b>1</b>" in child._repr_html_()


def test_the_plan_says_who_got_which_tokens_and_why_the_others_wait() -> None:
    sched, _ = shared_prefix_scheduler(budget=8, ids=("a", "b", "c", "d", "e"))
    sched.step()
    sched.step()
    stats = sched.step()  # decode [a, b] | prefill [c 9:13, d 8:10] | admitted [d] | e waits (budget)
    plan = stats.plan
    assert plan is not None and plan is sched.last_step.plan  # type: ignore[union-attr]
    rows = tables(plan._repr_html_())["plan"].texts()
    expected = [[c.request.req_id, f"prefill {c.start}:{c.end}", str(c.length)] for c in plan.prefill]
    expected += [[r.req_id, "decode", "1"] for r in plan.decode]
    expected += [[req_id, "waits", "0"] for req_id, _ in plan.skipped]
    assert [row[:3] for row in rows] == expected
    assert [row[3] for row in rows[len(rows) - len(plan.skipped):]] == [why for _, why in plan.skipped]
    assert sum(int(row[2]) for row in rows) == plan.total_tokens == stats["total_tokens"]
    assert plan.skipped and plan.decode  # the case covers all three kinds of row
    assert rows[0][3] == "continues its prompt; ends its prompt: first token"  # c 9:13, its last prompt rows
    assert rows[1][3] == "admitted, after 2 cached blocks (rows 0:8)"  # d starts after the shared prefix


def test_step_stats_are_a_dict_with_the_plan_attached() -> None:
    sched, _ = shared_prefix_scheduler()
    stats = sched.step()
    assert isinstance(stats, StepStats) and isinstance(stats, dict)
    assert json.loads(json.dumps(stats)) == dict(stats) and stats == dict(stats)
    html = stats._repr_html_()
    assert tables(html)["plan"].texts() == tables(stats.plan._repr_html_())["plan"].texts()  # type: ignore[union-attr]
    assert f"decode_tokens <b>{stats['decode_tokens']}</b>" not in html  # zero counts are left out
    assert f"prefill_tokens <b>{stats['prefill_tokens']}</b>" in html
    while sched.active:
        sched.step()
    idle = sched.step()
    assert idle.plan is None and idle["status"] == "no_active_requests" and "plan" not in tables(idle._repr_html_())
    assert sched.last_step is not idle  # an idle step does not replace the last step that ran


def test_the_block_grid_shows_each_block_where_the_block_table_has_it() -> None:
    sched, pool = shared_prefix_scheduler()
    for _ in range(3):
        sched.step()
    html = sched._repr_html_()
    running = {r.req_id: r.kv_cache.block_table for r in sched.running}  # type: ignore[attr-defined]
    grid = tables(html)["blocks"]
    drawn = {row[0].text: [c.text for c in row[1:] if c.text] for row in grid.rows[1:]}
    assert drawn == {req_id: [f"{b}*" if pool.ref_counts[b] > 1 else str(b) for b in blocks]
                     for req_id, blocks in running.items()}
    assert any(pool.ref_counts[b] > 1 for blocks in running.values() for b in blocks)  # prefix blocks are shared
    assert tables(html)["requests"].texts() == [
        [r.req_id, "running", r.phase, f" {r.prefill_pos}/{r.prefill_len}", f"{len(r.generated_tokens)}/4",
         str(len(r.kv_cache)), str(r.kv_cache.block_table)] for r in sched.running]  # type: ignore[attr-defined]
    assert "last step" in html and f"step {sched.last_step['step_id']}:" in html  # type: ignore[index]
    cache = sched.running[-1].kv_cache
    assert isinstance(cache, PagedKVCache)
    assert [c.text for c in tables(cache._repr_html_())["blocks"].cells()[0]] == [
        f"{b}*" if pool.ref_counts[b] > 1 else str(b) for b in cache.block_table]


def test_the_pool_grid_marks_used_shared_evictable_and_free_blocks() -> None:
    pool = BlockPool(20, 2, 4)
    a, b = pool.allocate(2)
    pool.acquire([a])  # a: two holders
    pool.cache_block(b, 123)
    pool.free([b])  # b: cached, nobody holds it
    (c,) = pool.allocate(1)
    cells = [cell for row in tables(pool._repr_html_())["pool"].cells() for cell in row]
    assert len(cells) == 20
    assert [cells[i].text for i in (a, b, c)] == [f"{a}*", str(b), str(c)]
    assert f"background:{SHARED}" in cells[a].style
    assert all(cells[i].text == "" and "background" not in cells[i].style for i in range(20) if i not in (a, b, c))
    html = pool._repr_html_()
    assert "used <b>2</b>" in html and "evictable <b>1</b>" in html and "free <b>17</b>" in html


def test_a_dense_cache_shows_its_length_and_capacity() -> None:
    cache = DenseKVCache(initial_capacity=8)
    cache.append(torch.ones(3, 4), torch.ones(3, 4))
    html = cache._repr_html_()
    assert "len <b>3</b>" in html and "capacity <b>8</b>" in html and 'data-filled="45"' in html


def test_html_reprs_show_a_script_request_id_as_text() -> None:
    sched, _ = shared_prefix_scheduler(budget=8, ids=(SCRIPT, "b" + SCRIPT, "c"))
    sched.step()
    batch = build_ragged_batch([(SCRIPT, 0, torch.ones(2, 4))])
    shown = [sched.running[0]._repr_html_(), sched._repr_html_(), sched.last_step._repr_html_(),  # type: ignore[union-attr]
             sched.last_step.plan._repr_html_(), batch._repr_html_()]  # type: ignore[union-attr]
    for html in shown:
        assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_metrics_and_a_serving_run_show_their_figures() -> None:
    metrics = MetricsPlugin(MetricsCollector(enable_memory_profiling=False))
    plugins = PluginManager()
    plugins.register_scheduler_plugin(metrics)
    sched = Scheduler(make_model(), 16, 8, plugins=plugins)
    for i in range(3):
        sched.add_request(make_request(f"m{i}", 5 + i, 3))
    sched.run_until_complete()
    collector = metrics.collector
    summary = collector.get_run_summary()
    html = collector._repr_html_()
    assert all(f"{k} <b>{fmt(summary[k])}</b>" in html for k in HEADLINE)
    assert tables(html)["summary"].texts() == [[k, fmt(v)] for k, v in summary.items()]
    assert repr(collector) == f"MetricsCollector(steps={len(collector.steps)}, requests=3, finished=3)"
    assert html.count("data:image/png;base64,") == 2  # batch composition and pool occupancy (no trace: no timeline)
    assert "<img" not in MetricsCollector(enable_memory_profiling=False)._repr_html_()  # no steps: nothing to draw

    specs = generate_workload(WorkloadConfig(6, LengthDist.uniform(4, 8), LengthDist.uniform(1, 4)))
    run = simulate(specs, make_config("continuous", max_num_seqs=3, max_tokens_per_step=16))
    html = run._repr_html_()
    assert tables(html)["summary"].texts() == [[k, fmt(run.summary[k])] for k in SUMMARY_KEYS]
    images = [part.split('"')[0] for part in html.split("base64,")[1:]]
    assert [base64.b64decode(i)[:8] for i in images] == [b"\x89PNG\r\n\x1a\n"] * 3
    assert repr(run) == f"RunResult({run.name!r}, requests=6, steps={len(run.steps)}, wall_s={run.wall_s:.3f})"


def test_without_matplotlib_a_run_shows_the_text_pictures(monkeypatch: pytest.MonkeyPatch) -> None:
    specs = generate_workload(WorkloadConfig(4, LengthDist.uniform(4, 8), LengthDist.uniform(1, 3)))
    run = simulate(specs, make_config("continuous", max_num_seqs=2, max_tokens_per_step=16))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert viz.pngs(run.steps) == {} and viz.metrics_pngs([]) == {}
    html = run._repr_html_()
    assert "<img" not in html and f"<pre>{escape(viz.overview(run.steps))}</pre>" in html


def test_big_objects_show_their_counts_without_the_grid() -> None:
    batch = build_ragged_batch([("big", 0, torch.zeros(65, 2))])
    assert "mask" not in tables(batch._repr_html_()) and "more than 64 rows" in batch._repr_html_()
    assert repr(batch) == "RaggedBatch(65 rows, dim 2: big pos 0..64)"
    pool = BlockPool(1025, 2, 2)
    assert "pool" not in tables(pool._repr_html_()) and "total <b>1025</b>" in pool._repr_html_()
    empty = PagedKVCache(4)  # no pool yet: nothing to draw but its figures
    assert "blocks" not in tables(empty._repr_html_()) and "len <b>0</b>" in empty._repr_html_()


def test_the_engine_and_its_configs_show_their_state() -> None:
    from cb_lab.engine import EngineConfig, LLMEngine
    from cb_lab.model.llama import LlamaModel
    from cb_lab.model.llama_config import LlamaConfig
    from cb_lab.sampling import SamplingParams

    config = EngineConfig(num_blocks=12, block_size=4, max_num_seqs=1)
    engine = LLMEngine(LlamaModel(LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)), config=config)
    engine.add_request("paged", SamplingParams(max_tokens=2, temperature=0))
    engine.add_request("ragged", SamplingParams(max_tokens=2, temperature=0))
    engine.step()  # one admitted (max_num_seqs=1), one waiting; the first holds blocks
    used = 12 - engine.pool.num_free_blocks
    assert used > 0 and len(engine.scheduler.running) == len(engine.scheduler.waiting) == 1
    assert repr(engine) == (f"LLMEngine(model: 2 layers, dim 32, 4 heads / 2 KV heads, vocab 258, float32; pool: 12 "
                            f"blocks x 4 tokens, {12 - used} free; running 1, waiting 1)")
    html = engine._repr_html_()
    assert f"pool <b>12 blocks x 4 tokens ({12 - used} free)</b>" in html and "waiting <b>1</b>" in html
    assert tables(html)["requests"].texts()[1][:2] == ["req-1", "waiting"]  # the scheduler's table
    assert tables(config._repr_html_())["fields"].texts() == tables(html)["fields"].texts() == [
        [f, str(getattr(config, f)), str(d)] for f, d in [
            ("max_num_seqs", 64), ("block_size", 16), ("num_blocks", None), ("kv_memory_mb", 64.0),
            ("max_tokens_per_step", 256), ("prefill_chunk_size", 64), ("dtype", "float32"), ("executor", "fused"),
            ("enable_prefix_caching", True)]]
    params = SamplingParams(temperature=0, stop_token_ids=[7, 8])
    shown = params._repr_html_()
    changed = [field for field, value, default in tables(shown)["fields"].texts() if value != default]
    assert changed == ["temperature", "stop_token_ids"] and "set <b>2 of 16 fields (bold)</b>" in shown
    assert shown.count("<b>") == 2 + len(changed)  # the title, the count, and each changed value
    assert "(7, 8)" in shown  # a value is shown as its repr (stop ids refuse anything but ints, so no markup)
    assert repr(params).startswith("SamplingParams(max_tokens=16, temperature=0,")  # the dataclass's, as before
