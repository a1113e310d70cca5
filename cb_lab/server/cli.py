"""``python -m cb_lab serve`` and ``start_server``: uvicorn in front of the app.

``serve_main`` blocks until Ctrl-C. ``start_server`` serves from a background thread on a
port it picks (0: a free one) and returns at once, for a test, a benchmark or a notebook::

    server = start_server(LLMEngine(model), "tiny")     # listening before it returns
    openai.OpenAI(base_url=server.url + "/v1", api_key="none").completions.create(...)
    server.stop()
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

import openai
import uvicorn

from cb_lab.async_engine import AsyncLLMEngine
from cb_lab.cli_generate import add_model_arguments, build_engine
from cb_lab.engine import LLMEngine
from cb_lab.exceptions import CBLabException
from cb_lab.live.hub import StepHub
from cb_lab.server.app import build_app
from cb_lab.server.metrics import ServerMetrics

__all__ = ["RunningServer", "serve_main", "serve_parser", "start_server"]


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cb_lab serve", description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine)")
    p.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free one")
    p.add_argument("--served-model-name", help="the name clients send as `model` (default: the model's)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="queued requests at most; one more gets 503 (default 256)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--quick", action="store_true",
                   help="check the install: serve on a free port, answer one completion and one chat through "
                        "the openai client, print them and stop")
    return p


@dataclass
class RunningServer:
    """A server on a background thread: ``url`` (``http://host:port``), ``stop()``."""

    url: str
    engine: AsyncLLMEngine
    metrics: ServerMetrics
    _server: _Server
    _thread: threading.Thread

    def stop(self) -> None:
        """Stop the engine (open responses end with an error), end the live page's event streams, stop
        accepting, end the thread."""
        self.engine.stop()
        self._server.close_live_pages()
        self._server.should_exit = True
        self._thread.join()
        self.engine.shutdown()


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket: connections queue in its backlog until uvicorn takes them, so the
    server can be called as soon as this returns (no wait for start-up)."""
    sock = socket.create_server((host, port), backlog=2048)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn that stops the engine first when told to exit (Ctrl-C): the responses in flight end at
    once with an error (a 503 body, or an error event then ``[DONE]``) instead of being cut off; and
    the live page's event streams end too, which an open page would otherwise hold open for
    ``timeout_graceful_shutdown`` seconds."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, hub: StepHub) -> None:
        super().__init__(config)
        self.async_engine = engine
        self.hub = hub

    def close_live_pages(self) -> None:
        self.hub.close()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.async_engine.stop()
        # A signal handler, on the event loop's thread, which may hold the hub's lock: close it from another.
        threading.Thread(target=self.close_live_pages, name="cb-lab-live-close").start()
        super().handle_exit(sig, frame)


KEEP_ALIVE_S = 30  # seconds an idle HTTP connection stays open (uvicorn's default: 5)


def _server(engine: LLMEngine, name: str, max_waiting: int, log_level: str) -> tuple[_Server, AsyncLLMEngine,
                                                                                      ServerMetrics]:
    metrics = ServerMetrics()
    async_engine = AsyncLLMEngine(engine, max_waiting=max_waiting, on_step=metrics.on_step)
    app = build_app(async_engine, name, metrics)
    # An idle connection outlives the client's keep-alive (httpx and so the openai client: 5 s), so the
    # client is always the one that closes it: at equal timeouts a request sent on a connection the
    # server is closing at that moment fails as a connection error.
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, timeout_keep_alive=KEEP_ALIVE_S)
    return _Server(config, async_engine, app.state.live_hub), async_engine, metrics


def start_server(engine: LLMEngine, name: str = "cb-lab", *, host: str = "127.0.0.1", port: int = 0,
                 max_waiting: int = 256, log_level: str = "warning") -> RunningServer:
    """Serve ``engine`` as model ``name`` from a background thread; returns once it is listening."""
    sock = _listen(host, port)
    server, async_engine, metrics = _server(engine, name, max_waiting, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="cb-lab-server", daemon=True)
    thread.start()
    bound_host, bound_port = sock.getsockname()[:2]
    return RunningServer(f"http://{bound_host}:{bound_port}", async_engine, metrics, server, thread)


def serve_main(argv: Sequence[str]) -> int:
    parser = serve_parser()
    args = parser.parse_args(argv)
    if args.max_waiting < 1:
        parser.error(f"--max-waiting must be >= 1, got {args.max_waiting}")
    level = "WARNING" if args.quick else args.log_level.upper()  # --quick prints its own lines only
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:  # the port first: a taken one is said at once, not after the model has loaded
        sock = _listen(args.host, 0 if args.quick else args.port)
        engine, about = build_engine(args)
    except OSError as error:
        parser.error(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}; give another --port "
                     "(0: a free one) or --host")
    except CBLabException as error:
        parser.error(str(error))
    name = args.served_model_name or (args.model or about).split("/")[-1]
    if args.quick:
        sock.close()
        return self_check(engine, name)
    server, async_engine, _ = _server(engine, name, args.max_waiting, args.log_level)
    host, port = sock.getsockname()[:2]
    print(f"cb-lab serving {about} as {name!r} at http://{host}:{port}/v1 (the live page: http://{host}:{port}/, "
          "metrics: /metrics); Ctrl-C stops",
          file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        async_engine.shutdown()
    return 0


def self_check(engine: LLMEngine, name: str) -> int:
    """One completion and one chat through the ``openai`` client against a server started here."""
    server = start_server(engine, name)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        text = client.completions.create(model=name, prompt="The capital of France is", max_tokens=8, temperature=0)
        chat = client.chat.completions.create(model=name, max_tokens=8, temperature=0,
                                              messages=[{"role": "user", "content": "What is a KV cache?"}])
    finally:
        server.stop()
    print(f"served {name!r} at {server.url}/v1")
    print(f"POST /v1/completions:      'The capital of France is' -> {text.choices[0].text!r}")
    print(f"POST /v1/chat/completions: 'What is a KV cache?' -> {chat.choices[0].message.content!r}")
    return 0
