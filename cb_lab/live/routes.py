"""The live page's routes: ``GET /`` and ``/dashboard`` (the page), ``/events`` (the steps), ``/trace``.

``/events`` is a server-sent-events stream. It opens with a ``hello`` (the run's id), sends
the recent steps a page needs to draw something at once, then one ``steps`` message per
batch of steps: every step that piled up since the last message, in one JSON object::

    event: steps
    id: 3f9a01c2:41                       # run id : last step id (EventSource resends it on reconnect)
    data: {"dropped": 0, "steps": [{...step 40...}, {...step 41...}]}

When requests are aborted between steps (a client hung up), an ``aborted`` message says who, and
the queues and pool after them (``recorder.abort_event``; an idle engine may run no step for
minutes, so the page cannot wait for the next one)::

    event: aborted
    data: {"after_step": 41, "aborted": ["r3"], "waiting": [], "running": [], "pool_used_blocks": 0, ...}

A page that reconnects sends that id back (``Last-Event-ID``): the same run goes on from the
step after it; another run (the server restarted) starts over. A comment line every
``keepalive_s`` seconds of silence lets the server notice a page that has gone.
``/trace`` is the hub's window as a trace file (``load_trace`` reads it; the page replays it).
:func:`attach_live` wires it all into a server: the plugin on the scheduler, the routes on the app.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from typing import TYPE_CHECKING

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from cb_lab.live.hub import Encoded, StepHub
from cb_lab.live.recorder import LiveTracePlugin

if TYPE_CHECKING:
    from cb_lab.core.scheduler import Scheduler

logger = logging.getLogger(__name__)

__all__ = ["attach_live", "dashboard_html", "live_router"]

RETRY_MS = 1000  # how soon a page reconnects after the stream broke (the SSE "retry" field)


def dashboard_html() -> str:
    """The page: one self-contained HTML file in the package (no build step, nothing fetched)."""
    return resources.files("cb_lab.live").joinpath("dashboard.html").read_text(encoding="utf-8")


def _steps_message(run_id: str, steps: Sequence[Encoded], dropped: int) -> str:
    body = '{"dropped": ' + str(dropped) + ', "steps": [' + ",".join(text for _, text in steps) + "]}"
    return f"event: steps\nid: {run_id}:{steps[-1][0]}\ndata: {body}\n\n"


def _resume_after(hub: StepHub, last_event_id: str | None) -> int | None:
    """The step a reconnecting page has seen, if it was watching this very run (else None: start over)."""
    run_id, _, step = (last_event_id or "").partition(":")
    return int(step) if run_id == hub.run_id and step.isdigit() else None


def live_router(hub: StepHub, model_name: str | None = None, *, max_prompts: int | None = None,
                keepalive_s: float = 15.0, backfill: int = 300) -> APIRouter:
    """The routes over ``hub``; ``app.include_router(live_router(hub))`` adds them to an app.

    ``model_name``: the model the app's ``/v1/completions`` serves (None: no such endpoint, a
    simulated run; the page then offers no prompt box). ``max_prompts``: the most prompts that
    endpoint takes in one POST (the queue's ``max_waiting``); the page checks its bursts against
    it. ``backfill``: how many recent steps a page that just connected is sent first.
    """
    router = APIRouter()
    page = dashboard_html()

    @router.get("/", response_class=HTMLResponse)
    @router.get("/dashboard", response_class=HTMLResponse)
    async def dashboard() -> str:
        return page

    @router.get("/events")
    async def events(request: Request) -> StreamingResponse:
        after = _resume_after(hub, request.headers.get("last-event-id"))
        sub, first = hub.subscribe(asyncio.get_running_loop(), after, backfill)

        async def stream() -> AsyncIterator[str]:
            try:
                hello = {"run_id": hub.run_id, "resumed": after is not None, "window": hub.window.maxlen,
                         "model": model_name, "max_prompts": max_prompts}
                yield f"retry: {RETRY_MS}\nevent: hello\ndata: {json.dumps(hello)}\n\n"
                if first:
                    yield _steps_message(hub.run_id, first, 0)
                while (batch := await sub.next_batch(keepalive_s)) is not None:
                    steps, dropped, abort = batch
                    if steps:
                        yield _steps_message(hub.run_id, steps, dropped)
                    if abort is not None:
                        yield f"event: aborted\ndata: {abort}\n\n"
                    if not steps and abort is None:
                        yield ": keep-alive\n\n"
            finally:  # the page left (the response was cancelled) or the hub closed
                hub.unsubscribe(sub)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.get("/trace")
    async def trace() -> Response:
        return Response(hub.trace_json(), media_type="application/json")

    return router


def attach_live(app: FastAPI, scheduler: Scheduler, model_name: str | None = None, *, max_prompts: int | None = None,
                window: int = 2000) -> StepHub:
    """Serve the live page from ``app`` and publish every step of ``scheduler`` to it; returns the hub
    (close it before the server stops: open pages would hold the shutdown). ``model_name`` and
    ``max_prompts``: as :func:`live_router` takes them.

    Call it before the scheduler has any request: the trace rebuilds the queues from the
    requests it saw arrive. The hub keeps the latest ``window`` steps (a server runs for days).
    """
    assert not scheduler.active, "attach the live page before any request arrives"
    hub = StepHub(window)
    scheduler.plugins.register_scheduler_plugin(LiveTracePlugin(hub, scheduler.max_tokens_per_step))
    app.include_router(live_router(hub, model_name, max_prompts=max_prompts))
    return hub
