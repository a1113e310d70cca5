"""The live page's data path, without a browser: each event is the step the scheduler planned, the
hub never waits and stays bounded, ``/events`` streams, resumes and starts over, ``--live --quick``
and ``--trace`` work from the command line."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_helpers import PlanLog, assert_events_are_the_plans, assert_pool_adds_up, sse

from cb_lab.cli import serve
from cb_lab.core.plan import StepPlan
from cb_lab.live.hub import StepHub
from cb_lab.live.recorder import MAX_GRID_BLOCKS, LiveTracePlugin
from cb_lab.live.routes import dashboard_html
from cb_lab.live.simulation import BackgroundServer, LiveSimulation, live_app
from cb_lab.monitoring.trace import StepTrace, load_trace
from cb_lab.plugins.builtin import MetricsPlugin
from cb_lab.serving import RunResult, make_config, simulate
from cb_lab.workload import LengthDist, WorkloadConfig, generate_workload

# A pool too small for the load (preemptions), a shared prefix (prefix hits, evictions, shared blocks).
SPECS = generate_workload(WorkloadConfig(24, LengthDist.uniform(12, 20), LengthDist.uniform(2, 16), num_prefixes=2,
                                         prefix_len=8, seed=3))
CONFIG = make_config("continuous", max_num_seqs=6, max_tokens_per_step=32, prefill_chunk_size=8, num_blocks=16,
                     block_size=4, enable_prefix_caching=True)


@pytest.fixture(scope="module")
def recorded() -> tuple[RunResult, list[StepPlan], StepHub]:
    hub, log = StepHub(window=None), PlanLog()
    result = simulate(SPECS, CONFIG, plugins=[LiveTracePlugin(hub, CONFIG.max_tokens_per_step), log])
    return result, log.plans, hub


def test_each_event_is_the_step_the_scheduler_planned(recorded: tuple[RunResult, list[StepPlan], StepHub]) -> None:
    result, plans, hub = recorded
    events = [json.loads(text) for _, text in hub.window]
    assert_events_are_the_plans(events, plans)
    assert [StepTrace.from_dict(e) for e in events] == result.steps  # the same trace TracePlugin records
    for e in events:
        assert_pool_adds_up(e)
    seen = {k: sum(bool(e[k]) for e in events) for k in ("preempted", "prefix_hits", "kv_evictions")}
    assert all(seen.values()), f"the workload should show every event the page draws: {seen}"
    assert "s" in "".join(e["blocks"] for e in events)
    assert events[-1]["pool_used_blocks"] == 0 and events[-1]["running"] == events[-1]["waiting"] == []


def test_a_pool_over_the_grid_limit_sends_its_cached_block_ids(
        recorded: tuple[RunResult, list[StepPlan], StepHub]) -> None:
    """No per-block states over MAX_GRID_BLOCKS, but the (few) cached blocks, so the page can still show them."""
    hub = StepHub(window=None)
    plugin = LiveTracePlugin(hub, CONFIG.max_tokens_per_step)
    simulate(SPECS, replace(CONFIG, num_blocks=MAX_GRID_BLOCKS + 1), plugins=[plugin])
    events = [json.loads(text) for _, text in hub.window]
    assert all(e["blocks"] is None and len(e["cached_ids"]) == e["pool_cached_blocks"] for e in events)
    assert events[-1]["cached_ids"] == sorted(plugin.pools[0].evictable) != []
    small = [json.loads(text) for _, text in recorded[2].window]  # 16 blocks: the grid says it all
    assert all(e["cached_ids"] is None and e["blocks"] is not None for e in small)


class ReferenceMetrics(MetricsPlugin):
    """A second MetricsPlugin beside the one ``simulate`` registers (plugins go by their class's name)."""


def test_first_tokens_are_where_the_requests_first_produced_a_token_not_where_a_recompute_ended() -> None:
    hub, metrics = StepHub(window=None), ReferenceMetrics()
    simulate(SPECS, CONFIG, plugins=[LiveTracePlugin(hub, CONFIG.max_tokens_per_step), metrics])
    events = [json.loads(text) for _, text in hub.window]
    first = {rid: e["step_id"] for e in events for rid in e["first_tokens"]}
    assert sum(len(e["first_tokens"]) for e in events) == len(first) == len(SPECS)  # once each, never again
    assert first == {rid: r.first_token_step for rid, r in metrics.collector.requests.items()}
    # The case the page got wrong: preempted after its first token, before any decode; its recompute
    # ends later, but its first token stays where it came out.
    decodes = {rid: [e["step_id"] for e in events if rid in e["decode"]] for rid in first}
    decoded = {rid: min(steps) for rid, steps in decodes.items() if steps}  # a one-token answer never decodes
    tricky = [(rid, e["step_id"]) for e in events for rid in e["preempted"]
              if rid in decoded and first[rid] < e["step_id"] < decoded[rid]]
    assert tricky, "the workload should preempt a request between its first token and its first decode"
    for rid, _ in tricky:  # the prefill before its first decode is the recompute, after its first token
        prefills = [e["step_id"] for e in events if any(c[0] == rid for c in e["prefill"])]
        assert first[rid] < max(step for step in prefills if step < decoded[rid])


def test_the_window_is_a_trace_file(recorded: tuple[RunResult, list[StepPlan], StepHub], tmp_path: Path) -> None:
    result, _, hub = recorded
    (tmp_path / "t.json").write_text(hub.trace_json())
    assert load_trace(tmp_path / "t.json") == result.steps


def test_a_subscriber_that_does_not_read_loses_its_oldest_steps_not_the_engine_its_time() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        hub = StepHub(window=50, queue_size=8)
        sub, first = hub.subscribe(loop)
        assert first == []
        for i in range(100):  # nobody reads meanwhile: publish returns every time
            hub.publish(i, str(i))
        batch = await sub.next_batch(5)
        assert batch is not None
        steps, dropped, abort = batch
        assert [i for i, _ in steps] == list(range(92, 100)) and dropped == 92 and abort is None
        assert len(hub.window) == 50 and hub.window[0][0] == 50
        assert [i for i, _ in hub.subscribe(loop, after=95)[1]] == [96, 97, 98, 99]  # a reconnect goes on
        assert [i for i, _ in hub.subscribe(loop, backfill=10)[1]] == list(range(90, 100))  # a new page: the latest
        assert await sub.next_batch(0.01) == ([], 0, None)  # silence: a keep-alive
        hub.close()
        assert await sub.next_batch(5) is None and hub.subscribe(loop)[0].closed

    asyncio.run(main())


def test_steps_published_from_another_thread_arrive_in_order() -> None:
    async def main() -> list[int]:
        hub = StepHub(queue_size=1000)
        sub, _ = hub.subscribe(asyncio.get_running_loop())
        engine = threading.Thread(target=lambda: [hub.publish(i, str(i)) for i in range(500)])
        engine.start()
        got: list[int] = []
        while len(got) < 500:
            batch = await sub.next_batch(10)
            assert batch is not None and batch[1] == 0
            got += [i for i, _ in batch[0]]
        engine.join()
        return got

    assert asyncio.run(main()) == list(range(500))


@pytest.fixture
def served() -> Iterator[tuple[StepHub, str]]:
    hub = StepHub(window=100)
    server = BackgroundServer(live_app(hub), hub)
    yield hub, server.url
    server.stop()


def test_the_page_is_one_self_contained_file(served: tuple[StepHub, str]) -> None:
    _, url = served
    for path in ("/", "/dashboard"):
        page = httpx.get(url + path, timeout=10)
        assert page.status_code == 200 and page.text == dashboard_html()
    assert "cb-lab live" in page.text and "http://" not in page.text and "https://" not in page.text


def test_events_stream_resume_after_a_reconnect_and_start_over_on_another_run(served: tuple[StepHub, str]) -> None:
    hub, url = served
    for i in range(5):
        hub.publish(i, json.dumps({"step_id": i}))
    with httpx.Client(base_url=url, timeout=10) as client:
        with client.stream("GET", "/events") as r:
            messages = sse(r.iter_lines())
            hello = next(messages)
            assert hello["event"] == "hello" and json.loads(hello["data"]) == {
                "run_id": hub.run_id, "resumed": False, "window": 100, "model": None, "max_prompts": None}
            backfill = next(messages)
            assert backfill["id"] == f"{hub.run_id}:4" and json.loads(backfill["data"])["dropped"] == 0
            threading.Thread(target=hub.publish, args=(5, json.dumps({"step_id": 5}))).start()  # the engine thread
            live = next(messages)
            assert live["event"] == "steps" and json.loads(live["data"])["steps"] == [{"step_id": 5}]
        with client.stream("GET", "/events", headers={"Last-Event-ID": f"{hub.run_id}:3"}) as r:
            messages = sse(r.iter_lines())
            assert json.loads(next(messages)["data"])["resumed"] is True
            assert [s["step_id"] for s in json.loads(next(messages)["data"])["steps"]] == [4, 5]
        with client.stream("GET", "/events", headers={"Last-Event-ID": "another-run:3"}) as r:
            messages = sse(r.iter_lines())
            assert json.loads(next(messages)["data"])["resumed"] is False
            assert [s["step_id"] for s in json.loads(next(messages)["data"])["steps"]] == [0, 1, 2, 3, 4, 5]
        assert [s["step_id"] for s in client.get("/trace").json()["steps"]] == list(range(6))


def test_a_live_simulation_streams_every_step_it_plans() -> None:
    sim = LiveSimulation(SPECS, CONFIG, pace=0.0)  # the run starts when the stream below connects
    try:
        with httpx.Client(base_url=sim.url, timeout=30) as client, client.stream("GET", "/events") as r:
            messages = sse(r.iter_lines())
            assert next(messages)["event"] == "hello"
            result = sim.wait(timeout=60)
            events: list[dict[str, Any]] = []
            while len(events) < len(result.steps):
                data = json.loads(next(messages)["data"])
                assert data["dropped"] == 0
                events += data["steps"]
    finally:
        sim.stop()
    assert [StepTrace.from_dict(e) for e in events] == result.steps
    log = PlanLog()
    simulate(SPECS, CONFIG, plugins=[log])  # the same run again (it is deterministic), its plans logged
    assert_events_are_the_plans(events, log.plans)


def test_simulate_live_quick_and_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--requests", "12", "--num-blocks", "24", "--block-size", "8"]
    assert serve(["simulate", "--live", "--quick", *args, "--trace", str(tmp_path / "live.json")]) == 0
    out = capsys.readouterr().out
    assert "GET /events: run" in out and "12 of 12 requests finished" in out and "(OK)" in out
    assert serve(["simulate", "--quick", *args, "--trace", str(tmp_path / "run.json")]) == 0
    assert f"trace: {len(load_trace(tmp_path / 'run.json'))} steps in" in capsys.readouterr().out
    untimed = [[replace(s, duration_s=0.0) for s in load_trace(tmp_path / name)] for name in ("live.json", "run.json")]
    assert untimed[0] == untimed[1]  # the same run, whether a page watched it or not
