"""The live page on the real server (``start_server``, a small random-weight Llama, the byte tokenizer):
``/events`` shows the steps the scheduler planned for requests sent through the OpenAI API, and in
Chromium the page's own burst button fills the batch, every row reaches "finished", the pool empties,
and with 200 requests in flight its backlog stays bounded. Browser tests skip without
``/usr/bin/chromium`` (``apt-get install -y chromium``)."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from helpers import make_llama
from live_helpers import PlanLog, assert_events_are_the_plans, assert_pool_adds_up, sse

from cb_lab.core.request import Request
from cb_lab.engine import EngineConfig, LLMEngine
from cb_lab.plugins.base import SchedulerPlugin
from cb_lab.server import RunningServer, start_server

ROOT = Path(__file__).resolve().parent.parent
MODEL = make_llama(vocab_size=258)
# A pool too small for 8 answers at once (preemptions) and room for 6 of them (2 wait for max_num_seqs).
CONFIG = EngineConfig(max_num_seqs=6, block_size=4, num_blocks=48, max_tokens_per_step=32, prefill_chunk_size=8)
WAIT_MS = 60_000
FINISHED = "document.querySelectorAll('#timeline-rows [data-state=finished]').length"


def serve(config: EngineConfig = CONFIG, *plugins: Any) -> RunningServer:
    engine = LLMEngine(copy.deepcopy(MODEL), config=config)
    for plugin in plugins:
        engine.scheduler.plugins.register_scheduler_plugin(plugin)
    return start_server(engine, "tiny", max_waiting=512)


async def _complete_all(url: str, prompts: list[str], max_tokens: int) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        answers = await asyncio.gather(*(client.post("/v1/completions", json={
            "prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}) for p in prompts))
    return [a.raise_for_status().json() for a in answers]


def complete_all(url: str, prompts: list[str], max_tokens: int) -> list[dict[str, Any]]:
    """Every prompt at once, each its own HTTP request; on a thread of its own, because Playwright's
    sync API keeps an event loop running on this one."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _complete_all(url, prompts, max_tokens)).result()


def test_the_event_stream_shows_the_steps_the_scheduler_planned() -> None:
    log = PlanLog()
    server = serve(CONFIG, log)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client, client.stream("GET", "/events") as r:
            messages = sse(r.iter_lines())
            hello = json.loads(next(messages)["data"])
            assert hello["model"] == "tiny" and hello["resumed"] is False and hello["max_prompts"] == 512
            prompts = [f"request {i} " + "x" * (5 * i) for i in range(8)]  # 3 to 13 blocks, 6 more to answer
            answers = complete_all(server.url, prompts, 24)
            events: list[dict[str, Any]] = []
            while len(events) < len(log.plans):  # the engine is idle: every step it ran is on its way
                data = json.loads(next(messages)["data"])
                assert data["dropped"] == 0
                events += data["steps"]
    finally:
        server.stop()
    assert_events_are_the_plans(events, log.plans)
    for e in events:
        assert_pool_adds_up(e)
    ids = {a["id"] + "-0" for a in answers}  # one engine request per prompt: the answer's id, "-", its index
    assert {r for e in events for r in e["finished"]} == ids == {r for e in events for r in e["arrived"]}
    assert any(e["preempted"] for e in events) and events[-1]["pool_used_blocks"] == 0




def test_a_burst_from_the_page_runs_to_the_end(page: tuple[Any, list[str]]) -> None:
    p, errors = page
    server = serve()
    try:
        p.goto(server.url + "/")
        p.wait_for_function("document.getElementById('status').dataset.state === 'live' && "
                            "!document.getElementById('burst').disabled", timeout=WAIT_MS)
        p.fill("#prompt", "Continuous batching keeps the GPU busy: requests join and leave every step")
        p.click("#burst")  # 8 by default: one POST /v1/completions, 8 prompts, stream: true
        p.wait_for_function(f"{FINISHED} === 8", timeout=WAIT_MS)
        p.wait_for_function("document.getElementById('pool-used').textContent === '0'", timeout=WAIT_MS)
        p.wait_for_function("document.querySelectorAll('#answers div.done').length === 8", timeout=WAIT_MS)
        assert p.evaluate("document.querySelectorAll('#timeline-rows div').length") == 8
        # The picture for the docs: the run replayed up to its last preemption (decodes, chunks, shared blocks).
        steps = httpx.get(server.url + "/trace", timeout=10).json()["steps"]
        k = max(i for i, s in enumerate(steps) if s["preempted"])
        p.click("#replay-server")
        p.wait_for_function("document.getElementById('replay-pos').textContent.startsWith('step 0 ')", timeout=WAIT_MS)
        p.fill("#replay-slider", str(k))
        p.wait_for_function(f"document.getElementById('budget-step').textContent === '{steps[k]['step_id']}'",
                            timeout=WAIT_MS)
        assert "preempted" in p.inner_text("#budget-text") and not errors, errors
        out = ROOT / "out"  # git-ignored; docs/images/live_page.png is a copy of it
        out.mkdir(exist_ok=True)
        p.evaluate("window.scrollTo(0, 0)")
        p.screenshot(path=str(out / "live_page.png"), full_page=True)
    finally:
        p.close()  # before the server stops
        server.stop()


def test_a_refused_burst_shows_the_servers_error_in_one_entry(page: tuple[Any, list[str]]) -> None:
    p, _ = page  # Chromium logs the refused POST as a console error itself
    server = serve()
    try:
        p.goto(server.url + "/")
        p.wait_for_function("!document.getElementById('burst').disabled", timeout=WAIT_MS)
        assert p.get_attribute("#burst-n", "max") == "512"  # the server's max_waiting
        p.wait_for_function("document.getElementById('max-tokens').max === '2048'", timeout=WAIT_MS)  # /v1/models
        p.fill("#max-tokens", "2048")  # the page allows the whole context; with the prompt it is too long
        p.fill("#burst-n", "3")
        p.click("#burst")
        p.wait_for_selector("#answers div.error", timeout=WAIT_MS)
        entries = p.locator("#answers div").all_inner_texts()
        assert len(entries) == 1 and entries[0].startswith("#1-#3 (a burst of 3) → error 400: prompt 0: ")
        assert "exceed the model's context of 2048 tokens" in entries[0]
    finally:
        p.close()
        server.stop()


def test_two_hundred_requests_in_flight_keep_the_page_backlog_bounded(page: tuple[Any, list[str]]) -> None:
    p, errors = page
    server = serve(EngineConfig(max_num_seqs=256, block_size=8, num_blocks=2048, max_tokens_per_step=512,
                                prefill_chunk_size=64))
    cdp = p.context.new_cdp_session(p)
    cdp.send("Emulation.setCPUThrottlingRate", {"rate": 8})  # a slow machine: frames take longer than steps
    try:
        p.goto(server.url + "/")
        p.wait_for_function("document.getElementById('status').dataset.state === 'live'", timeout=WAIT_MS)
        prompts = [f"prompt {i}: " + "continuous batching " * (i % 7) for i in range(200)]
        complete_all(server.url, prompts, 24)
        p.wait_for_function(f"{FINISHED} === 200", timeout=WAIT_MS)
        p.wait_for_function("document.getElementById('pool-used').textContent === '0'", timeout=WAIT_MS)
        stats = p.evaluate("window.cbLive.stats")
        assert stats["maxBacklog"] <= p.evaluate("window.cbLive.MAX_PENDING")
        assert not errors, errors
    finally:
        cdp.send("Emulation.setCPUThrottlingRate", {"rate": 1})
        p.close()
        server.stop()


class HoldWhenAllDecode(SchedulerPlugin):
    """Holds the engine thread after the first step in which every request has two tokens, until
    ``release`` is set: the test hangs up while they are surely running, with many tokens to go."""

    def __init__(self, n: int) -> None:
        self.n, self.requests, self.reached, self.release = n, [], threading.Event(), threading.Event()

    def on_request_added(self, request: Request, step_id: int) -> None:
        self.requests.append(request)

    def after_step(self, stats: dict[str, Any]) -> None:
        if len(self.requests) == self.n and all(len(r.generated_tokens) >= 2 for r in self.requests):
            self.reached.set()
            self.release.wait()


def test_requests_aborted_on_an_idle_engine_leave_the_page_at_once(page: tuple[Any, list[str]]) -> None:
    """A client that hangs up aborts its requests between steps; nothing is left to run, so no step
    follows. The ``aborted`` message says so anyway: to a page watching, and to one that connects later."""
    p, errors = page
    hold = HoldWhenAllDecode(3)
    server = serve(EngineConfig(max_num_seqs=6, block_size=4, num_blocks=160, max_tokens_per_step=32,
                                prefill_chunk_size=8), hold)
    try:
        p.goto(server.url + "/")  # a page that watches as it happens
        p.wait_for_function("document.getElementById('status').dataset.state === 'live'", timeout=WAIT_MS)
        with httpx.Client(base_url=server.url, timeout=60) as client, client.stream("GET", "/events") as r:
            messages = sse(r.iter_lines())
            assert next(messages)["event"] == "hello"
            body = {"prompt": ["a", "b", "c"], "max_tokens": 300, "ignore_eos": True, "stream": True, "temperature": 0}
            with client.stream("POST", "/v1/completions", json=body) as answer:  # its text may not have begun:
                assert answer.status_code == 200 and hold.reached.wait(WAIT_MS / 1000)  # bytes of half a character
            hold.release.set()  # the client is gone: its three requests are aborted
            steps: list[dict[str, Any]] = []

            def until_none_runs() -> dict[str, Any]:  # keep-alives keep the stream open: bounded below
                while (m := next(messages))["event"] != "aborted" or json.loads(m["data"])["running"]:
                    steps.extend(json.loads(m["data"])["steps"] if m["event"] == "steps" else [])
                return dict(json.loads(m["data"]))

            pool = ThreadPoolExecutor(1)
            try:
                abort = pool.submit(until_none_runs).result(timeout=WAIT_MS / 1000)
            finally:
                pool.shutdown(wait=False)  # a reader still waiting ends when the stream closes
            assert len(steps[-1]["running"]) == 3 and steps[-1]["pool_used_blocks"] > 0  # what the page showed
            assert abort["after_step"] == steps[-1]["step_id"]
            assert sorted(abort["aborted"]) == sorted(steps[-1]["running"])
            assert (abort["waiting"], abort["pool_used_blocks"], abort["blocks"].count("u")) == ([], 0, 0)
        trace = httpx.get(server.url + "/trace", timeout=10).json()["steps"]
        assert trace[-1]["step_id"] == steps[-1]["step_id"]  # no step ran after the abort; the file holds steps only
        for _ in ("watching", "reloaded"):  # reloaded: a page that connects later gets the steps, then the abort
            p.wait_for_function("document.querySelectorAll('#timeline-rows [data-state=aborted]').length === 3",
                                timeout=WAIT_MS)
            assert (p.inner_text("#num-running"), p.inner_text("#pool-used"), p.inner_text("#step-id")) == (
                "0", "0", str(steps[-1]["step_id"]))
            p.reload()
        assert not errors, errors
    finally:
        hold.release.set()
        p.close()
        server.stop()
