"""``python -m cb_lab.bench live``: how long the live page takes to redraw with 200 requests in flight.

A server (``start_server``) on the random-weight Llama (``LlamaConfig()``, the byte tokenizer),
the page in Debian's Chromium through Playwright, then ``--requests`` completions at once
(``--max-tokens`` each, all running together: ``max_num_seqs`` is as large). The page counts its
own frames (``window.cbLive.stats``): how many steps each frame applied, the redraw time per
frame (mean and worst), the steps merged away (by the server's bounded queue or the page's) and
its largest backlog. ``--throttle R`` slows the page's CPU R times (Chrome's emulation), to see
what a slow laptop does. Without ``/usr/bin/chromium`` or Playwright it says so and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from cb_lab.engine import EngineConfig, LLMEngine
from cb_lab.model.llama import LlamaModel
from cb_lab.model.llama_config import LlamaConfig

__all__ = ["add_parser"]

CHROMIUM = "/usr/bin/chromium"
FINISHED = "document.querySelectorAll('#timeline-rows [data-state=finished]').length"


async def _complete_all(url: str, n: int, max_tokens: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        answers = await asyncio.gather(*(client.post("/v1/completions", json={
            "prompt": f"request {i}: " + "continuous batching " * (i % 8), "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}) for i in range(n)))
    for answer in answers:
        answer.raise_for_status()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Serve, open the page, send the requests; the page's counters for the frames they caused."""
    from playwright.sync_api import sync_playwright  # a test and benchmark dependency only

    from cb_lab.server import start_server  # FastAPI and uvicorn: imported only when this runs

    config = EngineConfig(max_num_seqs=max(args.requests, 1), block_size=16, num_blocks=args.requests * 8,
                          max_tokens_per_step=512, prefill_chunk_size=64)
    server = start_server(LLMEngine(LlamaModel(LlamaConfig(), seed=args.seed), config=config), "random",
                          max_waiting=args.requests + 1)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            if args.throttle > 1:
                page.context.new_cdp_session(page).send("Emulation.setCPUThrottlingRate", {"rate": args.throttle})
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('status').dataset.state === 'live'", timeout=60_000)
            page.evaluate("Object.assign(window.cbLive.stats, {frames: 0, applied: 0, recentRedrawMs: [], "
                          "maxBacklog: 0})")  # count the requests' frames only, not the page's first ones
            with ThreadPoolExecutor(1) as pool:  # Playwright's sync API keeps an event loop on this thread
                pool.submit(asyncio.run, _complete_all(server.url, args.requests, args.max_tokens)).result()
            page.wait_for_function(f"{FINISHED} === {args.requests}", timeout=600_000)
            stats: dict[str, Any] = page.evaluate("window.cbLive.stats")
            steps = page.evaluate("window.cbLive.live().last.step_id + 1")
            page.close()
            browser.close()
    finally:
        server.stop()
    times = sorted(stats["recentRedrawMs"])
    return {"steps": steps, "frames": stats["frames"], "steps_per_frame": stats["applied"] / stats["frames"],
            "redraw_p50_ms": statistics.median(times), "redraw_p95_ms": times[int(0.95 * (len(times) - 1))],
            "redraw_max_ms": times[-1], "merged": stats["droppedByServer"] + stats["droppedByPage"],
            "max_backlog": stats["maxBacklog"]}


def live_main(args: argparse.Namespace) -> int:
    if shutil.which(CHROMIUM) is None:
        print(f"bench live: needs Debian's Chromium at {CHROMIUM} (apt-get install -y chromium); skipped")
        return 0
    r = measure(args)
    throttle = f", CPU throttled {args.throttle}x" if args.throttle > 1 else ""
    print(f"live page: {args.requests} requests in flight, {args.max_tokens} tokens each, {r['steps']} engine steps"
          f"{throttle}")
    print(f"  frames drawn          {r['frames']:8d}   ({r['steps_per_frame']:.1f} steps applied per frame)")
    print(f"  redraw per frame      {r['redraw_p50_ms']:8.1f} ms p50, {r['redraw_p95_ms']:.1f} ms p95 (nearest rank), "
          f"{r['redraw_max_ms']:.1f} ms worst")
    print(f"  steps merged away     {r['merged']:8d}   (bounded queues: the server's per page, the page's own)")
    print(f"  largest page backlog  {r['max_backlog']:8d}   steps waiting for a frame")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("live", help="the live page's redraw time with 200 requests in flight (Chromium)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--throttle", type=float, default=1.0, help="slow the page's CPU this many times (default 1)")
    p.add_argument("--quick", action="store_true", help="16 requests of 8 tokens")
    p.set_defaults(main=live_main, apply_quick=apply_quick)


def apply_quick(args: argparse.Namespace) -> None:
    args.requests, args.max_tokens = 16, 8
