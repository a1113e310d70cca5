"""The live page in a real browser (Playwright driving Debian's Chromium), over simulated runs: it
follows a run to the end, replays one (a saved file or the server's window), starts over when the
server restarts, and keeps its backlog bounded when it cannot draw as fast as steps come.

Never downloads a browser: without ``/usr/bin/chromium`` (``apt-get install -y chromium``; ``make
test`` installs it where it can) these tests skip. Waits are Playwright's, with timeouts."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import httpx

from cb_lab.live.simulation import LiveSimulation
from cb_lab.monitoring.trace import TRACE_FORMAT
from cb_lab.serving import make_config
from cb_lab.workload import LengthDist, WorkloadConfig, generate_workload

SPECS = generate_workload(WorkloadConfig(24, LengthDist.uniform(12, 20), LengthDist.uniform(2, 16), num_prefixes=2,
                                         prefix_len=8, seed=3))
CONFIG = make_config("continuous", max_num_seqs=6, max_tokens_per_step=32, prefill_chunk_size=8, num_blocks=16,
                     block_size=4, enable_prefix_caching=True)
WAIT_MS = 30_000
FINISHED = "document.querySelectorAll('#timeline-rows [data-state=finished]').length"


def stats(page: Any) -> dict[str, Any]:
    result: dict[str, Any] = page.evaluate("window.cbLive.stats")
    return result


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
        p.click("#back")
        p.wait_for_function(f"document.getElementById('budget-step').textContent === '{step.step_id - 1}'",
                            timeout=WAIT_MS)
        assert p.inner_text("#pool-used") == str(result.steps[k - 1].pool_used_blocks)
        p.screenshot(path=str(tmp_path / "replay.png"))
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
        second.wait(timeout=60)
        p.wait_for_function(f"{FINISHED} === 10", timeout=WAIT_MS)
        assert p.inner_text("#run-id") == second.hub.run_id != run_id
        assert stats(p)["runs"] == 2 and stats(p)["reconnects"] >= 1
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
