"""The OpenAI-compatible HTTP API over an ``AsyncLLMEngine`` (FastAPI).

============================  =====================================================
``POST /v1/completions``      text or token-id prompts; ``stream`` for server-sent events
``POST /v1/chat/completions`` a conversation through the model's chat template
``GET /v1/models``            the one model this server serves
``GET /health``               200 while the engine thread is alive
``GET /metrics``              Prometheus text (``cb_lab/server/metrics.py``)
``GET /``, ``/dashboard``      the live page: every step drawn as it happens (``cb_lab/live``)
``GET /events``, ``/trace``    its stream of steps (server-sent events) and the recent steps as a trace file
============================  =====================================================

Every request becomes one engine request per prompt (``n`` samples inside it); the handler
awaits its outputs and writes them out as they grow. A streamed answer is OpenAI's wire
format: ``data: {chunk}`` lines, then ``data: [DONE]``. A client that hangs up aborts its
requests; their blocks are free before the next step. Errors are OpenAI-shaped JSON:
400 for a bad body, 404 for another model's name, 503 when the queue is full.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cb_lab.async_engine import AsyncLLMEngine, EngineStepError, QueueFullError, RequestStream
from cb_lab.engine_inputs import Prompt
from cb_lab.exceptions import CBLabException
from cb_lab.live.routes import attach_live
from cb_lab.outputs import RequestOutput
from cb_lab.sampling import SamplingParams
from cb_lab.server.metrics import ServerMetrics
from cb_lab.server.protocol import DEFAULT_MAX_TOKENS, ChatCompletionRequest, CompletionRequest, error_body
from cb_lab.server.wire import Delta, chat_chunk, chat_response, completion_chunk, completion_response, new_delta, usage

__all__ = ["build_app"]

T = TypeVar("T")


class _HTTPError(Exception):
    """Ends a handler with an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def build_app(engine: AsyncLLMEngine, model_name: str, metrics: ServerMetrics | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``model_name``."""
    app = FastAPI(title="cb-lab", summary="continuous batching, served")
    # the live page: /, /events, /trace; its bursts are checked against the queue (a larger POST is refused whole)
    app.state.live_hub = attach_live(app, engine.engine.scheduler, model_name, max_prompts=engine.max_waiting)
    metrics = metrics or ServerMetrics()
    metrics.bind(engine)
    tokenizer = engine.engine.tokenizer
    context = engine.engine.model.model.config.max_position

    @app.exception_handler(_HTTPError)
    async def http_error(_: Request, error: _HTTPError) -> JSONResponse:
        return JSONResponse(error_body(error.message, param=error.param, kind=error.kind, code=error.status),
                            status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error.errors())
        return JSONResponse(error_body(message, param=param, code=400), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def starlette_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        """FastAPI's own 404 (no such route), 405 (wrong method), 400 (a body it cannot parse), OpenAI-shaped."""
        return JSONResponse(error_body(str(error.detail), code=error.status_code), status_code=error.status_code,
                            headers=error.headers)

    @app.api_route("/health", methods=["GET", "HEAD"], response_model=None)
    async def health() -> Response | dict[str, str]:
        if not engine.is_running:
            return JSONResponse(error_body("the engine thread has stopped", kind="server_error", code=503),
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "cb-lab",
            "max_model_len": context}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        _check_model(name, model_name)
        return card

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, raw: Request) -> Response | dict[str, Any]:
        _check_model(body.model, model_name)
        max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        params = _params(lambda: body.sampling_params(max_tokens, body.logprobs))
        top = body.logprobs or 0
        prompts = body.prompts()
        if not prompts:
            raise _HTTPError(400, "prompt is an empty list; give at least one prompt", param="prompt")
        meta: dict[str, Any] = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        streams = await _add(engine, prompts, params, meta["id"])
        if body.stream:
            return _sse(streams, params.n, lambda d: completion_chunk(meta, d, tokenizer, top), body.include_usage,
                        meta, "text_completion")
        final = await _until_done(raw, _final(streams))
        return completion_response(meta, final, params.n, tokenizer, top)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, raw: Request) -> Response | dict[str, Any]:
        _check_model(body.model, model_name)
        top = (body.top_logprobs or 0) if body.logprobs else None
        (prompt,) = _params(lambda: engine.engine.chat_prompts(body.conversation()))
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = max(context - len(prompt), 0) if asked is None else asked  # default: to the context's end
        params = _params(lambda: body.sampling_params(max_tokens, top))
        meta: dict[str, Any] = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                                "model": model_name}
        streams = await _add(engine, [prompt], params, meta["id"])
        if body.stream:
            return _sse(streams, params.n, lambda d: chat_chunk(meta, d, tokenizer, top or 0), body.include_usage,
                        meta, "chat.completion.chunk")
        final = await _until_done(raw, _final(streams))
        return chat_response(meta, final, tokenizer, top or 0)

    return app


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def _path(loc: Sequence[Any]) -> list[str]:
    """Where in the body, without pydantic's union-member tags: ``messages.0.role``."""
    return [str(p) for p in loc if p != "body" and str(p) not in _TYPE_TAGS and "[" not in str(p)]


def _validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """The first bad field and everything wrong with it: ``stop: Input should be a valid string, or
    Input should be a valid list`` (pydantic reports each member of a union as its own error)."""
    if errors[0]["type"] == "json_invalid":
        return f"the body is not valid JSON: {errors[0]['ctx'].get('error', errors[0]['msg'])}", None
    path = _path(errors[0]["loc"])
    if not path:  # the body itself: missing, or not an object
        return f"the body must be a JSON object: {errors[0]['msg']}", None
    same = [e["msg"] for e in errors if _path(e["loc"]) == path]
    return f"{'.'.join(path)}: {', or '.join(dict.fromkeys(same))}", path[0]


def _check_model(asked: str | None, served: str) -> None:
    if asked is not None and asked != served:
        raise _HTTPError(404, f"The model `{asked}` does not exist; this server serves `{served}` (GET /v1/models)",
                         param="model", kind="model_not_found")


def _params(build: Callable[[], T]) -> T:
    """``build()``, its ``CBLabException`` (a value the library refuses) as a 400."""
    try:
        return build()
    except CBLabException as error:
        raise _HTTPError(400, str(error), param=_param_of(str(error))) from error


async def _add(engine: AsyncLLMEngine, prompts: Sequence[Prompt], params: SamplingParams,
               request_id: str) -> list[RequestStream]:
    """One engine request per prompt, all or none, in one trip to the engine thread."""
    ids = [f"{request_id}-{i}" for i in range(len(prompts))]
    try:
        return await engine.add_requests(prompts, params, ids)
    except (QueueFullError, EngineStepError) as error:  # full, or stopped: come back later
        raise _HTTPError(503, str(error), kind="service_unavailable") from error
    except CBLabException as error:
        message = str(error)  # the engine names the request by its id: the client knows its prompts by index
        for i, rid in enumerate(ids):
            message = message.replace(f"prompt of {rid}", f"prompt {i}").replace(rid, f"prompt {i}")
        raise _HTTPError(400, message, param=_param_of(message)) from error


def _param_of(message: str) -> str | None:
    """The body field an engine error is about, from the words it uses."""
    for param in ("stop_token_ids", "min_tokens", "max_tokens", "top_p", "temperature", "logprobs", "stop",
                  "repetition_penalty", "prompt"):
        if param in message:
            return param
    return None


def _abort(streams: Sequence[RequestStream]) -> None:
    for stream in streams:
        stream.abort()


async def _merged(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """``(prompt index, output)`` from all ``streams`` as they come; leaving early aborts them all."""
    queue: asyncio.Queue[tuple[int, RequestOutput | None | CBLabException]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except EngineStepError as error:
            await queue.put((i, error))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await queue.get()
            if isinstance(item, CBLabException):
                raise item
            if item is None:
                left -= 1
                continue
            yield i, item
    finally:  # done, failed, or the client hung up: nothing keeps running for nobody
        for task in tasks:
            task.cancel()
        _abort(streams)


async def _final(streams: Sequence[RequestStream]) -> list[RequestOutput]:
    final: dict[int, RequestOutput] = {}
    async for i, out in _merged(streams):
        final[i] = out
    return [final[i] for i in range(len(streams))]


async def _until_done(raw: Request, work: Awaitable[T]) -> T:
    """``work``, cancelled if the client hangs up first (its requests are aborted)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(raw))
    await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not task.done():
        task.cancel()
        raise _HTTPError(499, "the client closed the connection", kind="client_closed_request")
    try:
        return task.result()
    except EngineStepError as error:  # a failed step (500), or a server shutting down (503)
        stopped = "stopped" in str(error)
        raise _HTTPError(503 if stopped else 500, str(error), kind="server_error") from error


async def _disconnected(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def _sse(streams: Sequence[RequestStream], n: int, to_chunk: Callable[[list[Delta]], dict[str, Any]],
         include_usage: bool, meta: dict[str, Any], obj: str) -> StreamingResponse:
    """``data: {chunk}`` per step that changed something, the usage chunk if asked, ``data: [DONE]``."""

    async def events() -> AsyncIterator[str]:
        final: dict[int, RequestOutput] = {}
        sent: dict[int, Delta] = {}  # the last delta of each choice: where the next one starts
        try:
            async for i, out in _merged(streams):
                final[i] = out
                deltas = [d for c in out.outputs if (d := new_delta(i * n + c.index, c, sent)) is not None]
                if deltas:
                    yield _data(to_chunk(deltas))
        except EngineStepError as error:
            yield _data(error_body(str(error), kind="server_error", code=500))
        if include_usage:
            yield _data({**meta, "object": obj, "choices": [], "usage": usage(list(final.values()))})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
