"""``python -m cb_lab simulate --live``: the serving simulation, drawn step by step in a browser.

::

    python -m cb_lab simulate --live --requests 48 --num-blocks 40     # open the URL it prints
    python -m cb_lab simulate --live --quick                           # check the page, the stream, the trace

It serves the live page (``cb_lab/live/``) on 127.0.0.1 over a simulated run, paced for the
eye (``--pace`` seconds a step), and keeps serving once the run is over so the page can replay
it. ``--quick`` runs the check a test needs and stops: fetch the page, read the first steps
from ``/events``, let the run finish unpaced and read the whole run back from ``/trace``.
"""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from cb_lab.live.simulation import LiveSimulation
from cb_lab.serving import RunResult, ServingConfig
from cb_lab.workload_io import RequestSpec

__all__ = ["live_main", "quick_check", "watch"]


def live_main(args: argparse.Namespace, specs: list[RequestSpec], about: str, name: str,
              config: ServingConfig) -> RunResult | None:
    """Serve the run on ``args.port`` until Ctrl-C (``--quick``: a free port, a check, then stop); the
    finished run, for ``cli.py`` to report (None when it was stopped before the end)."""
    sim = LiveSimulation(specs, config, name=name, dim=args.dim, seed=args.seed, pace=0.0 if args.quick else args.pace,
                         port=0 if args.quick else args.port)
    print(f"cb-lab simulate --live: {about}\nthe live page: {sim.url}/")
    if config.num_blocks is None:
        print("(dense caches: the block-pool grid stays empty; add --num-blocks 64 to watch the pool)")
    try:
        result = quick_check(sim) if args.quick else watch(sim, args.pace)
    finally:
        sim.stop()
        if args.trace:
            Path(args.trace).write_text(sim.hub.trace_json())
            print(f"trace: {len(sim.hub.window)} steps in {args.trace}")
    return result


def watch(sim: LiveSimulation, pace: float) -> RunResult | None:
    """Until Ctrl-C: the run (when a page connects), then the page keeps it for replay."""
    print(f"open it in a browser: the run starts when the page connects ({pace:g} s a step); Ctrl-C stops")
    try:
        result = sim.wait()
        print(f"the run is over ({result.summary['steps']} steps); the page can replay it (Replay: replay this run). "
              "Ctrl-C stops the server")
        threading.Event().wait()
    except KeyboardInterrupt:
        print("stopped")
        return None
    return result


def _first_steps(lines: Iterator[str]) -> list[dict[str, Any]]:
    """The steps of the first ``steps`` message of an event stream."""
    event = ""
    for line in lines:
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: ") and event == "steps":
            steps: list[dict[str, Any]] = json.loads(line.removeprefix("data: "))["steps"]
            return steps
    raise RuntimeError("the event stream ended before its first step")


def quick_check(sim: LiveSimulation) -> RunResult:
    """What a browser would do, with httpx: the page, the first steps of the stream, the whole trace."""
    with httpx.Client(base_url=sim.url, timeout=60) as client:
        page = client.get("/")
        page.raise_for_status()
        with client.stream("GET", "/events") as stream:  # the run starts now: its first step comes first
            first = _first_steps(stream.iter_lines())
        result = sim.wait(timeout=300)
        steps = client.get("/trace").json()["steps"]
    finished = {req_id for s in steps for req_id in s["finished"]}
    print(f"GET /: the page, {len(page.content) / 1024:.0f} KB, self-contained")
    step = first[0]
    print(f"GET /events: run {sim.hub.run_id}, first message: step {step['step_id']}, {len(step['prefill'])} prefill "
          f"chunks, {sum(n for _, _, n in step['prefill'])} of a {step['budget']}-token budget")
    print(f"GET /trace: {len(steps)} steps, {len(finished)} of {len(result.requests)} requests finished, "
          f"{sum(len(s['preempted']) for s in steps)} preemptions")
    return result
