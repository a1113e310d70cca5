"""The live page over a simulated run: ``python -m cb_lab simulate --live``, no model needed.

The serving simulation (:func:`cb_lab.serving.simulate`) runs on a background thread with a
:class:`~cb_lab.live.recorder.LiveTracePlugin` and a pacing plugin (``pace`` seconds per step,
so an eye can follow), while uvicorn serves the page and its event stream from another::

    sim = LiveSimulation(specs, make_config("continuous", num_blocks=64), pace=0.1)
    print(sim.url)          # open it: the run starts when the first page connects
    result = sim.wait()     # the RunResult, once every request finished
    sim.stop()

The hub keeps every step of the run (it is finite), so the page can replay all of it.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import uvicorn
from fastapi import FastAPI

from cb_lab.exceptions import CBLabException
from cb_lab.live.hub import StepHub
from cb_lab.live.recorder import LiveTracePlugin
from cb_lab.live.routes import live_router
from cb_lab.plugins.base import SchedulerPlugin
from cb_lab.serving import RunResult, ServingConfig, simulate
from cb_lab.workload_io import RequestSpec

logger = logging.getLogger(__name__)

__all__ = ["BackgroundServer", "LiveSimulation", "RunStopped", "live_app"]


class RunStopped(CBLabException):
    """The live run was stopped before it finished (the page's server is going away)."""


def live_app(hub: StepHub) -> FastAPI:
    """An app with the live page's routes only (a simulated run has no OpenAI endpoint)."""
    app = FastAPI(title="cb-lab live", summary="the serving simulation, step by step")
    app.include_router(live_router(hub))
    return app


class BackgroundServer:
    """uvicorn serving ``app`` from a background thread on ``host:port`` (0: a free port).

    It listens before the constructor returns, so ``url`` can be called at once. ``stop()``
    closes ``hub`` first: an open event stream would otherwise hold the shutdown.
    """

    def __init__(self, app: FastAPI, hub: StepHub, host: str = "127.0.0.1", port: int = 0) -> None:
        sock = socket.create_server((host, port))
        bound_host, bound_port = sock.getsockname()[:2]
        self.url = f"http://{bound_host}:{bound_port}"
        self.hub = hub
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="cb-lab-live",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.hub.close()
        self._server.should_exit = True
        self._thread.join()


class _Pace(SchedulerPlugin):
    """Waits ``pace`` seconds after each step; raises :class:`RunStopped` once ``stop`` is set."""

    def __init__(self, pace: float, stop: threading.Event) -> None:
        self.pace, self.stop = pace, stop

    def after_step(self, stats: dict[str, Any]) -> None:
        if self.stop.wait(self.pace):
            raise RunStopped(f"stopped after step {stats['step_id']}")


class LiveSimulation:
    """``simulate(specs, config)`` on a thread, published step by step to a page on :attr:`url`.

    The run waits for the first page (or ``/events`` client) to connect, so nobody misses its
    start. ``pace``: seconds between steps (0: as fast as it goes).
    """

    def __init__(self, specs: Sequence[RequestSpec], config: ServingConfig, *, name: str | None = None,
                 dim: int = 16, seed: int = 0, pace: float = 0.1, host: str = "127.0.0.1", port: int = 0) -> None:
        self._go = threading.Event()  # set by the first subscriber, or by stop()
        self._stop = threading.Event()
        self.hub = StepHub(window=None, on_subscribe=self._go.set)
        self.server = BackgroundServer(live_app(self.hub), self.hub, host, port)
        self.url = self.server.url
        plugins = [LiveTracePlugin(self.hub, config.max_tokens_per_step), _Pace(pace, self._stop)]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cb-lab-simulation")
        self.future: Future[RunResult] = self._pool.submit(self._run, list(specs), config, name, dim, seed, plugins)

    def _run(self, specs: list[RequestSpec], config: ServingConfig, name: str | None, dim: int, seed: int,
             plugins: list[SchedulerPlugin]) -> RunResult:
        self._go.wait()
        if self._stop.is_set():
            raise RunStopped("stopped before any page connected")
        logger.info("live run starting: %d requests, %s", len(specs), self.url)
        return simulate(specs, config, name=name, dim=dim, seed=seed, plugins=plugins)

    def wait(self, timeout: float | None = None) -> RunResult:
        """The run's result once it has finished (what ``simulate`` returns); its exception if it failed."""
        return self.future.result(timeout)

    def stop(self) -> None:
        """Stop the run (if it is still going) and the server."""
        self._stop.set()
        self._go.set()
        self._pool.shutdown(wait=True)
        self.server.stop()
