"""The live page in a real browser (Playwright driving Debian's Chromium), over simulated runs: it
follows a run to the end, replays one (a saved file or the server's window), starts over when the
server restarts, and keeps its backlog bounded when it cannot draw as fast as steps come. Over
hand-made traces: what a learner saw go wrong (a TTFT mark after a preemption, a huge pool, a
crowded budget bar, long ids, many rows, long answers, bad burst sizes) stays right.

Never downloads a browser: without ``/usr/bin/chromium`` (``apt-get install -y chromium``; ``make
test`` installs it where it can) these tests skip. Waits are Playwright's, with timeouts."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from live_helpers import trace_file, trace_step

from cb_lab.live.hub import StepHub
from cb_lab.live.routes import live_router
from cb_lab.live.simulation import BackgroundServer, LiveSimulation
from cb_lab.monitoring.trace import TRACE_FORMAT
from cb_lab.serving import make_config, simulate
from cb_lab.workload import LengthDist, WorkloadConfig, generate_workload

SPECS = generate_workload(WorkloadConfig(24, LengthDist.uniform(12, 20), LengthDist.uniform(2, 16), num_prefixes=2,
                                         prefix_len=8, seed=3))
CONFIG = make_config("continuous", max_num_seqs=6, max_tokens_per_step=32, prefill_chunk_size=8, num_blocks=16,
                     block_size=4, enable_prefix_caching=True)
WAIT_MS = 30_000
FINISHED = "document.querySelectorAll('#timeline-rows [data-state=finished]').length"


# The queues chart: its points, and its pixels drawn below the top 12 px (a line, not a caption).
CHART = """(() => { const c = document.getElementById('chart-queues'), dpr = window.devicePixelRatio || 1;
  const d = c.getContext('2d').getImageData(0, Math.ceil(12 * dpr), c.width, c.height - Math.ceil(12 * dpr)).data;
  let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0;
  return {points: window.cbLive.shown().buckets.length, pixels: n}; })()"""


def stats(page: Any) -> dict[str, Any]:
    result: dict[str, Any] = page.evaluate("window.cbLive.stats")
    return result


def wait_for_text(page: Any, selector: str, text: str) -> None:
    page.wait_for_function(f"document.querySelector({json.dumps(selector)}).textContent === {json.dumps(text)}",
                           timeout=WAIT_MS)


def test_the_page_follows_a_run_to_its_end(page: tuple[Any, list[str]]) -> None:
    p, errors = page
    sim = LiveSimulation(SPECS, CONFIG, pace=0.0)
    try:
        p.goto(sim.url + "/")
        result = sim.wait(timeout=60)
        p.wait_for_function(f"{FINISHED} === {len(SPECS)}", timeout=WAIT_MS)
        p.wait_for_function("document.getElementById('pool-used').textContent === '0'", timeout=WAIT_MS)
        assert p.inner_text("#step-id") == str(result.steps[-1].step_id)
        assert p.inner_text("#pool-total") == str(CONFIG.num_blocks)
        assert p.get_attribute("#send", "disabled") is not None  # a simulated run has no model to prompt
        assert stats(p)["droppedByPage"] == 0 and not errors
    finally:
        sim.stop()


def test_replay_stops_on_a_preemption_and_shows_that_step(page: tuple[Any, list[str]], tmp_path: Path) -> None:
    p, errors = page
    sim = LiveSimulation(SPECS, CONFIG, pace=0.0)
    try:
        p.goto(sim.url + "/")
        result = sim.wait(timeout=60)
        p.wait_for_function(f"{FINISHED} === {len(SPECS)}", timeout=WAIT_MS)
        p.click("#replay-server")  # this run, from GET /trace
        p.wait_for_function("document.getElementById('replay-pos').textContent.startsWith('step 0 ')", timeout=WAIT_MS)
        p.click("#next-preempt")
        k = next(i for i, s in enumerate(result.steps) if s.preempted)
        step = result.steps[k]
        p.wait_for_function(f"document.getElementById('budget-step').textContent === '{step.step_id}'", timeout=WAIT_MS)
        assert f"preempted {' '.join(step.preempted)}" in p.inner_text("#budget-text")
        assert p.inner_text("#pool-used") == str(step.pool_used_blocks)
        assert p.input_value("#replay-slider") == str(k)
        # The charts: one point per replayed step so far, and their captions say the header's numbers.
        assert p.evaluate(CHART)["points"] == k + 1 and p.evaluate(CHART)["pixels"] > 0
        assert p.inner_text("#num-running") == str(len(step.running))
        assert p.inner_text("#label-queues").startswith(
            f"requests running {len(step.running)}, waiting {len(step.waiting)} (max ")
        assert p.inner_text("#tok-per-s") == str(step.tokens_used)
        assert p.inner_text("#label-tps").startswith(f"tokens in the step {step.tokens_used} (")
        assert p.inner_text("#label-kv") == f"KV blocks in use {step.pool_used_blocks} of {CONFIG.num_blocks}"
        p.click("#back")
        p.wait_for_function(f"document.getElementById('budget-step').textContent === '{step.step_id - 1}'",
                            timeout=WAIT_MS)
        assert p.inner_text("#pool-used") == str(result.steps[k - 1].pool_used_blocks)
        p.screenshot(path=str(tmp_path / "replay.png"))
        # "next eviction" past the last one says so, and stays on that step.
        evictions = [i for i, s in enumerate(result.steps) if s.kv_evictions]
        p.fill("#replay-slider", "0")
        for i in evictions:
            p.click("#next-evict")
            p.wait_for_function(f"document.getElementById('replay-slider').value === '{i}'", timeout=WAIT_MS)
        assert p.inner_text("#replay-note") == ""
        p.click("#next-evict")
        wait_for_text(p, "#replay-note", f"no eviction after step {result.steps[evictions[-1]].step_id}")
        assert p.is_visible("#replay-note") and p.input_value("#replay-slider") == str(evictions[-1])
    finally:
        sim.stop()
    # A plain trace file (TracePlugin.to_json: no "blocks", no "t"): the page rebuilds the grid from the tables.
    plain = {"format": TRACE_FORMAT, "steps": [s.to_dict() for s in result.steps]}
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    p.set_input_files("#trace-file", str(tmp_path / "plain.json"))
    p.wait_for_function(f"document.getElementById('replay-pos').textContent.endsWith('of {len(result.steps)})')",
                        timeout=WAIT_MS)
    p.fill("#replay-slider", str(k))  # a range input: fill sets its value and fires "input"
    p.wait_for_function(f"document.getElementById('budget-step').textContent === '{step.step_id}'", timeout=WAIT_MS)
    assert p.inner_text("#pool-used") == str(step.pool_used_blocks)
    assert not errors


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_a_restarted_server_is_a_new_run(page: tuple[Any, list[str]]) -> None:
    p, _ = page  # the console logs the refused reconnections while the server is down: expected here
    port = free_port()
    first = LiveSimulation(SPECS[:6], CONFIG, pace=0.0, port=port)
    p.goto(first.url + "/")
    first.wait(timeout=60)
    p.wait_for_function(f"{FINISHED} === 6", timeout=WAIT_MS)
    run_id = p.inner_text("#run-id")
    first.stop()
    second = LiveSimulation(SPECS[:10], CONFIG, pace=0.0, port=port)  # same address: EventSource reconnects
    try:
        steps = len(second.wait(timeout=60).steps)
        p.wait_for_function(f"{FINISHED} === 10", timeout=WAIT_MS)
        assert p.inner_text("#run-id") == second.hub.run_id != run_id
        assert stats(p)["runs"] == 2 and stats(p)["reconnects"] >= 1
        assert stats(p)["applied"] == steps and p.inner_text("#page-stats").startswith(f"{steps} steps drawn, 0 merged")
    finally:
        second.stop()


def test_a_page_that_cannot_keep_up_drops_steps_instead_of_queueing_them(page: tuple[Any, list[str]]) -> None:
    """More steps at once than the page's cap (``?max_pending=5``): it keeps the newest, counts the
    rest, and still shows the run's last step as it is (the queues in each step carry the state)."""
    p, errors = page
    sim = LiveSimulation(SPECS, CONFIG, pace=0.0)
    try:
        with httpx.Client(base_url=sim.url, timeout=30) as client, client.stream("GET", "/events") as r:
            next(r.iter_lines())  # connected: the run starts, and ends before the page below opens
            result = sim.wait(timeout=60)
        p.goto(sim.url + "/?max_pending=5")  # its first message holds every step of the run (the backfill)
        last = result.steps[-1].step_id
        p.wait_for_function(f"document.getElementById('step-id').textContent === '{last}'", timeout=WAIT_MS)
        s = stats(p)
        assert s["maxBacklog"] == 5 and s["droppedByPage"] == len(result.steps) - 5 and s["applied"] == 5
        assert p.inner_text("#pool-used") == "0" and p.inner_text("#num-running") == "0"
        assert p.evaluate("[...window.cbLive.live().reqs.values()].every(r => r.state === 'finished')")
        assert not errors
    finally:
        sim.stop()


# ---- hand-made traces, replayed from a file on a server that runs nothing ----

@pytest.fixture
def quiet(page: tuple[Any, list[str]]) -> Iterator[tuple[Any, list[str]]]:
    """The page on a server with no steps, that says it serves a model "tiny" taking at most 64
    prompts a POST (there is no such endpoint: a test answers the page's POSTs with ``page.route``);
    ``/v1/models`` lists it without a context length."""
    p, errors = page
    hub = StepHub()
    app = FastAPI()
    app.include_router(live_router(hub, "tiny", max_prompts=64))
    app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": "tiny", "object": "model"}]})
    server = BackgroundServer(app, hub)
    try:
        p.goto(server.url + "/")
        p.wait_for_function("document.getElementById('status').dataset.state === 'live' && "
                            "!document.getElementById('burst').disabled", timeout=WAIT_MS)
        yield p, errors
    finally:
        server.stop()


def replay(p: Any, tmp_path: Path, steps: list[dict[str, Any]]) -> None:
    """Replay ``steps`` from a file and stop on the last one."""
    p.set_input_files("#trace-file", str(trace_file(tmp_path / "hand.json", steps)))
    p.wait_for_function(f"document.getElementById('replay-pos').textContent.endsWith('of {len(steps)})')",
                        timeout=WAIT_MS)
    p.fill("#replay-slider", str(len(steps) - 1))
    wait_for_text(p, "#budget-step", str(steps[-1]["step_id"]))


def test_the_first_token_mark_stays_where_the_first_token_came_out(quiet: tuple[Any, list[str]],
                                                                   tmp_path: Path) -> None:
    p, errors = quiet
    result = simulate(SPECS, CONFIG)
    first = {rid: s.step_id for s in result.steps for rid in s.first_tokens}
    decoded = {rid: min(s.step_id for s in result.steps if rid in s.decode) for rid in first}
    tricky = {rid for s in result.steps for rid in s.preempted if first[rid] < s.step_id < decoded[rid]}
    assert tricky, "the workload should preempt a request between its first token and its first decode"
    replay(p, tmp_path, [s.to_dict() for s in result.steps])
    ttft = p.evaluate("Object.fromEntries([...window.cbLive.shown().reqs.values()].map(r => [r.rid, r.ttft]))")
    assert ttft == first
    for rid in tricky:  # the row's title says it too (the ▲ is drawn at the same step)
        assert p.get_attribute(f"#timeline-rows [data-req='{rid}']", "title").endswith(
            f"first token in step {first[rid]}")
    assert not errors


PIXEL = """([k]) => { const g = window.cbLive.grid(), c = document.getElementById('pool-grid');
  const dpr = window.devicePixelRatio || 1, x = ((k % g.cols) + 0.5) * g.cell * dpr;
  const y = (Math.floor(k / g.cols) + 0.5) * g.cell * dpr;
  return [...c.getContext('2d').getImageData(Math.floor(x), Math.floor(y), 1, 1).data.slice(0, 3)]; }"""


def test_a_huge_pool_is_drawn_as_squares_of_several_blocks(quiet: tuple[Any, list[str]], tmp_path: Path) -> None:
    """``serve --model random``'s default pool (32,768 blocks, over the server's MAX_GRID_BLOCKS: no "blocks" in the
    steps): the page draws one readable square per K blocks, coloured by the busiest of them."""
    p, errors = quiet
    tables = [["a", list(range(100))], ["b", [*range(16), *range(100, 120)]]]  # 0-15 shared, 16-119 in use
    replay(p, tmp_path, [trace_step(0, arrived=["a", "b"], running=["a", "b"], block_tables=tables,
                                    pool_used_blocks=120, pool_num_blocks=32768)])
    grid = p.evaluate("(({perCell, cell, count, cols}) => ({perCell, cell, count, cols}))(window.cbLive.grid())")
    per = grid["perCell"]
    assert grid["cell"] >= 6 and grid["count"] == -(-32768 // per) and per in (8, 16, 32, 64)
    assert p.inner_text("#pool-scale").startswith(f"one square = {per} blocks")
    assert p.inner_text("#pool-shared") == "16" and p.inner_text("#pool-total") == "32768"
    shared, in_use, free = [176, 122, 161], [78, 121, 167], [238, 238, 238]  # --sh, --p, --free
    assert p.evaluate(PIXEL, [0]) == shared  # blocks 0-15 (and up to per - 1): the busiest is shared
    assert p.evaluate(PIXEL, [119 // per]) == in_use
    assert p.evaluate(PIXEL, [grid["count"] - 1]) == free
    assert not errors


def test_cached_blocks_of_a_huge_pool_show_as_cached(quiet: tuple[Any, list[str]], tmp_path: Path) -> None:
    """Over MAX_GRID_BLOCKS the server sends no per-block states, but the cached blocks' ids: their squares
    are orange (experiment 3 of the docs, on ``serve --model random``'s 32,768 blocks), not free."""
    p, errors = quiet
    cached = list(range(4000, 4130))
    replay(p, tmp_path, [trace_step(0, arrived=["a"], running=["a"], block_tables=[["a", list(range(100))]],
                                    pool_used_blocks=100, pool_num_blocks=32768, pool_cached_blocks=130,
                                    cached_ids=cached)])
    per = p.evaluate("window.cbLive.grid().perCell")
    assert p.evaluate(PIXEL, [4000 // per]) == [245, 183, 112]  # --c
    assert p.evaluate(PIXEL, [4200 // per]) == [238, 238, 238]  # --free
    assert p.inner_text("#pool-cached") == "130" and "cached blocks show as free" not in p.inner_text("#pool-scale")
    assert not errors


LAYOUT = """(() => { const box = e => e.getBoundingClientRect(), bar = document.getElementById('budget-bar');
  return {bar: box(bar).right, panel: box(bar.parentElement).right, scroll: bar.scrollWidth - bar.clientWidth,
          width: bar.clientWidth, pool: box(document.getElementById('pool-grid')).right,
          aside: box(document.querySelector('aside')).left,
          spans: [...bar.children].map(s => [s.className, box(s).width, s.scrollWidth - s.clientWidth])}; })()"""


def test_many_chunks_share_the_budget_bar_in_proportion_and_never_widen_it(quiet: tuple[Any, list[str]],
                                                                         tmp_path: Path) -> None:
    p, errors = quiet
    decoders, prefills = [f"d{i}" for i in range(100)], [f"p{i}" for i in range(200)]
    replay(p, tmp_path, [trace_step(0, budget=512, arrived=decoders + prefills, running=decoders + prefills,
                                    decode=decoders, prefill=[[rid, 0, 2] for rid in prefills])])
    layout = p.evaluate(LAYOUT)
    assert layout["bar"] <= layout["panel"] and layout["scroll"] == 0 and layout["pool"] <= layout["aside"]
    widths = {cls: [w for c, w, _ in layout["spans"] if c == cls] for cls in ("decode", "prefill", "unused")}
    px = layout["width"] / 512  # the bar is the budget: a segment's width is its tokens' share
    assert widths["decode"] == [pytest.approx(100 * px, abs=0.5)]
    assert widths["unused"] == [pytest.approx(12 * px, abs=0.5)]
    assert len(widths["prefill"]) == 200 and all(w == pytest.approx(2 * px, abs=0.5) for w in widths["prefill"])
    assert all(cut <= 0 for _, _, cut in layout["spans"])  # a label fits its segment or is left out
    assert not errors


HEX = "3f9a01c2b7e54d0f9a1c2b3d4e5f6a7b"


def test_long_ids_get_short_labels_and_keep_the_full_id_in_titles(quiet: tuple[Any, list[str]], tmp_path: Path) -> None:
    """The server's ids (``cmpl-<32 hex>-<prompt index>``) in the budget bar, its heading and the rows."""
    p, errors = quiet
    ids = [f"cmpl-{HEX}-{i}" for i in range(3)]
    steps = [trace_step(0, budget=64, arrived=ids, running=ids, prefill=[[ids[0], 0, 24], [ids[1], 0, 24]]),
             trace_step(1, budget=64, running=ids[:2], waiting=[ids[2]], preempted=[ids[2]], decode=ids[:2],
                        prefill=[[ids[1], 24, 16]])]
    replay(p, tmp_path, steps)
    assert p.inner_text("#budget-text").endswith("preempted 3f9a-2") and ids[2] not in p.inner_text("#budget-text")
    assert p.get_attribute("#budget-text", "title") == f"preempted: {ids[2]}"
    p.fill("#replay-slider", "0")
    wait_for_text(p, "#budget-step", "0")
    spans = p.evaluate("[...document.querySelectorAll('#budget-bar span')].map(s => [s.textContent, s.title, "
                       "s.scrollWidth - s.clientWidth])")
    assert [text for text, _, _ in spans[:2]] == ["3f9a-0 0:24", "3f9a-1 0:24"]
    assert [title for _, title, _ in spans[:2]] == [f"prefill {ids[0]} rows 0:24", f"prefill {ids[1]} rows 0:24"]
    assert all(cut <= 0 for _, _, cut in spans)
    assert p.inner_text(f"#timeline-rows [data-req='{ids[0]}']").startswith("3f9a-0")
    assert not errors


def test_many_rows_keep_their_height_and_the_timeline_scrolls(quiet: tuple[Any, list[str]], tmp_path: Path) -> None:
    p, errors = quiet
    ids = [f"r{i}" for i in range(128)]
    replay(p, tmp_path, [trace_step(0, arrived=ids, waiting=ids)])
    rows = p.evaluate("""(() => { const t = document.getElementById('timeline');
      const rows = [...t.querySelectorAll('#timeline-rows div')];
      const heights = rows.map(r => r.getBoundingClientRect().height);
      const canvas = document.getElementById('timeline-canvas');
      t.scrollTop = t.scrollHeight;
      const view = t.getBoundingClientRect(), last = rows[rows.length - 1].getBoundingClientRect();
      return {heights, canvas: canvas.getBoundingClientRect().height, scrolls: t.scrollHeight > t.clientHeight,
              lastShown: last.top >= view.top && last.bottom <= view.bottom}; })()""")
    assert len(rows["heights"]) == 128 and min(rows["heights"]) >= 10
    assert rows["canvas"] == 14 + 128 * rows["heights"][0] and rows["scrolls"] and rows["lastShown"]
    assert not errors


def test_a_burst_size_is_checked_before_anything_is_sent(quiet: tuple[Any, list[str]]) -> None:
    p, errors = quiet
    posts: list[str] = []
    p.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    assert p.get_attribute("#burst-n", "max") == "64"  # the server's max_prompts, from its hello
    for value in ("1000", "0", "-1", "2.5", "65"):
        p.fill("#burst-n", value)
        p.click("#burst")
        wait_for_text(p, "#input-error", f"a burst of {value}? give a whole number from 1 to 64")
        assert p.is_visible("#input-error")
    assert posts == [] and p.locator("#answers div").count() == 0 and not errors


def test_max_tokens_is_checked_before_anything_is_sent(quiet: tuple[Any, list[str]]) -> None:
    """-3 and 2.5 came back as the server's 400, 0 as an empty answer nobody explained."""
    p, errors = quiet
    posts: list[str] = []
    p.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    for value in ("-3", "2.5", "0", "40000", ""):
        for button in ("#send", "#burst"):
            p.fill("#max-tokens", value)
            p.click(button)
            wait_for_text(p, "#input-error", f"max tokens of {value or '(not a number)'}? "
                          "give a whole number from 1 to 32768")
    assert posts == [] and p.locator("#answers div").count() == 0 and not errors


def test_max_tokens_stops_at_the_served_models_context(quiet: tuple[Any, list[str]]) -> None:
    """The box said "1 to 32768" where the model's context was 2048 (its /v1/models entry says so)."""
    p, errors = quiet
    models = {"object": "list", "data": [{"id": "tiny", "object": "model", "max_model_len": 2048}]}
    p.route("**/v1/models", lambda route: route.fulfill(status=200, json=models))
    p.reload()
    p.wait_for_function("document.getElementById('max-tokens').max === '2048'", timeout=WAIT_MS)
    p.fill("#max-tokens", "3000")
    p.click("#send")
    wait_for_text(p, "#input-error", "max tokens of 3000? give a whole number from 1 to 2048")
    assert not errors


def test_a_timeline_wider_than_its_panel_says_which_steps_it_shows(quiet: tuple[Any, list[str]],
                                                                  tmp_path: Path) -> None:
    """Past about 130 steps the first columns left the timeline with no word; at 800 px the step
    numbers of the axis ran into each other."""
    p, errors = quiet
    p.set_viewport_size({"width": 800, "height": 600})
    replay(p, tmp_path, [trace_step(i, arrived=["a"] if i == 0 else [], running=["a"], decode=["a"])
                         for i in range(300)])
    note = re.fullmatch(r"showing steps (\d+) to 299", p.inner_text("#timeline-note"))
    assert note and 0 < int(note[1]) < 299, p.inner_text("#timeline-note")
    assert stats(p)["axisEvery"] > 10 and not errors  # 10 columns are too narrow for a 3-digit number


def test_long_answers_and_error_bodies_stay_inside_the_side_panel(quiet: tuple[Any, list[str]]) -> None:
    p, errors = quiet
    chunk = {"choices": [{"index": i, "text": "x" * 4000, "finish_reason": "length"} for i in range(2)]}
    replies = iter([
        {"status": 200, "content_type": "text/event-stream", "body": f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"},
        {"status": 400, "content_type": "application/json", "body": json.dumps({"error": {"message": "y" * 3000}})},
    ])
    p.route("**/v1/completions", lambda route: route.fulfill(**next(replies)))
    p.fill("#burst-n", "2")
    p.click("#burst")
    p.wait_for_function("document.querySelectorAll('#answers div.done').length === 2", timeout=WAIT_MS)
    p.click("#send")
    p.wait_for_selector("#answers div.error", timeout=WAIT_MS)
    boxes = p.evaluate("""(() => { const aside = document.querySelector('aside').getBoundingClientRect();
      const answers = document.getElementById('answers');
      return {wide: answers.scrollWidth - answers.clientWidth, entries: [...answers.children].map(d => [
        d.getBoundingClientRect().right <= aside.right, d.scrollWidth - d.clientWidth,
        d.scrollHeight > d.clientHeight])};
      })()""")
    assert boxes["wide"] == 0 and len(boxes["entries"]) == 3  # wrapped, and each scrolls in its own box
    assert all(inside and cut <= 0 and scrolls for inside, cut, scrolls in boxes["entries"])
    assert p.inner_text("#answers div.error span") == "error 400: " + "y" * 3000
    assert [e for e in errors if "400" not in e] == []  # Chromium logs the refused POST itself


def test_a_replay_says_it_is_one_and_counts_evictions_in_words(quiet: tuple[Any, list[str]], tmp_path: Path) -> None:
    p, errors = quiet
    replay(p, tmp_path, [trace_step(0, kv_evictions=2), trace_step(1, kv_evictions=1)])
    assert p.inner_text("#budget-text").endswith(", 1 eviction")
    assert p.inner_text("#page-stats").startswith("replaying a trace of 2 steps, redraw ")
    p.fill("#replay-slider", "0")
    wait_for_text(p, "#budget-step", "0")
    assert p.inner_text("#budget-text").endswith(", 2 evictions") and not errors


def test_a_timeline_over_its_row_cap_says_how_many_it_shows(quiet: tuple[Any, list[str]], tmp_path: Path) -> None:
    """After a burst of 256 the header said "running 38" with no row for some of them: the page keeps
    the latest 200 rows, and now says so."""
    p, errors = quiet
    ids = [f"r{i:03d}" for i in range(256)]
    replay(p, tmp_path, [trace_step(0, arrived=ids, waiting=ids)])
    assert p.inner_text("#timeline-note") == "showing the latest 200 of 256 requests"
    assert p.locator("#timeline-rows div").count() == 200
    assert p.locator("#timeline-rows div").first.get_attribute("data-req") == "r056"
    (tmp_path / "fewer").mkdir()  # another file: the same one again fires no change
    replay(p, tmp_path / "fewer", [trace_step(0, arrived=ids[:200], waiting=ids[:200])])
    assert p.inner_text("#timeline-note") == "" and not errors


# The tokens chart as the page drew it: per column of CSS pixels, the topmost drawn row (None: nothing).
TPS_TOPS = """(() => { const c = document.getElementById('chart-tps'), dpr = window.devicePixelRatio || 1;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, tops = [];
  for (let x = 0; x < c.width; x += Math.round(dpr)) {
    let top = null;
    for (let y = 0; y < c.height && top === null; y++) if (d[(y * c.width + x) * 4 + 3] > 0) top = y / dpr;
    tops.push(top);
  }
  return {tops, height: c.height / dpr}; })()"""


def live_steps(p: Any, times: list[float]) -> None:
    """The page watching a server whose steps (16 tokens each) ran at ``times`` seconds, then stopped."""
    hub = StepHub()
    for i, t in enumerate(times):
        step = trace_step(i, arrived=["a"] if i == 0 else [], running=["a"], decode=["a"] * 16)
        hub.publish(i, json.dumps(step | {"t": t}))
    app = FastAPI()
    app.include_router(live_router(hub))
    server = BackgroundServer(app, hub)
    try:
        p.goto(server.url + "/")
        wait_for_text(p, "#step-id", str(len(times) - 1))
    finally:
        server.stop()


def test_a_short_run_draws_its_charts(page: tuple[Any, list[str]]) -> None:
    """A burst over in under a second fills one half-second bucket: it used to draw 0 pixels."""
    p, errors = page
    live_steps(p, [0.01 * i for i in range(8)])
    drawn = [top for top in p.evaluate(TPS_TOPS)["tops"] if top is not None]
    assert len(drawn) >= 3 and min(drawn) < 5  # a bar of the highest value, at least 3 px wide
    assert p.inner_text("#label-tps").endswith("(prefill + decode; max 256)") and not errors  # 128 tokens in 0.5 s


def test_idle_time_is_drawn_at_zero_not_bridged(page: tuple[Any, list[str]]) -> None:
    """Steps for a second, 30 idle seconds, steps again: the tokens/s line lies at 0 in between."""
    p, errors = page
    times = [0.1 * i for i in range(10)] + [30 + 0.1 * i for i in range(10)]
    live_steps(p, times)
    chart = p.evaluate(TPS_TOPS)
    tops, height, n = chart["tops"], chart["height"], len(chart["tops"])
    gap = tops[n * 55 // 100: n * 90 // 100]  # the last 60 s end at 31.5 s: 4.5 s to 25.5 s, all idle
    assert all(top is not None and top >= height - 4 for top in gap), gap
    assert min(top for top in tops if top is not None) < 5 and not errors  # the busy seconds reach the top
