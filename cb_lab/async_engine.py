"""``AsyncLLMEngine``: one background thread steps an ``LLMEngine``; many callers await their tokens.

A server has many callers and one engine. The callers live on an asyncio event loop (one per
HTTP connection, say); the engine's step is blocking tensor work. So, as in vLLM's async engine,
one thread owns the ``LLMEngine`` and loops::

    take what arrived since the last step (new requests, aborts)   # requests join between steps
    engine.step()                                                 # one continuous-batching step
    hand each changed RequestOutput to its caller's queue         # a snapshot: the engine keeps mutating its own

Only that thread touches the engine, so the engine needs no locks; callers talk to it through
an inbox of commands. Usage, from async code::

    engine = AsyncLLMEngine(LLMEngine(model, tokenizer))
    async for out in engine.generate("Hello", SamplingParams(max_tokens=8)):
        print(out.text)                      # the text so far; out.finished on the last one
    engine.shutdown()

A caller that stops iterating (a client that hung up: its task is cancelled) aborts its request;
the engine thread frees its blocks before the next step. A step that raises fails the requests
it was running (their callers get the error), not the engine: the others carry on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

from cb_lab.engine import LLMEngine
from cb_lab.engine_inputs import Prompt
from cb_lab.exceptions import CBLabException, ValidationError
from cb_lab.outputs import RequestOutput
from cb_lab.sampling import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLMEngine", "EngineStepError", "QueueFullError", "RequestStream"]

StepObserver = Callable[[LLMEngine, list[RequestOutput]], None]


class QueueFullError(CBLabException):
    """More requests wait than ``max_waiting`` allows; try again later (a server answers 503)."""


class EngineStepError(CBLabException):
    """A step failed while it ran this request (the request was aborted, the engine carries on), or
    the engine has stopped."""


def _snapshot(out: RequestOutput) -> RequestOutput:
    """A copy the engine thread will not change: the lists it grows are copied (the token ids, the
    logprob dicts per token, the timings); what it never changes again is shared."""
    def copy(lst: list[Any] | None) -> list[Any] | None:
        return None if lst is None else list(lst)

    samples = [replace(c, token_ids=list(c.token_ids), logprobs=copy(c.logprobs)) for c in out.outputs]
    return replace(out, outputs=samples, token_times=list(out.token_times), prompt_logprobs=copy(out.prompt_logprobs))


class RequestStream:
    """One request's outputs, from the engine thread to its caller's event loop: iterate it with
    ``async for``; ``abort()`` when you stop listening before it finished."""

    def __init__(self, engine: AsyncLLMEngine, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = ""  # set once the engine thread has added it
        self.finished = False
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> bool:
        """Hand ``item`` to the caller's loop (from the engine thread); False when that loop is closed."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the caller is gone for good
            return False
        return True

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        """The newest output: when the caller fell behind, the steps it missed merge into one
        (outputs are cumulative, so nothing is lost). An error from the engine is raised."""
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        while not self._queue.empty() and not isinstance(item, BaseException):
            item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def abort(self) -> None:
        """Stop the request if it is still running (its blocks are freed before the next step)."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class AsyncLLMEngine:
    """An ``LLMEngine`` stepped by a background thread, for many concurrent async callers.

    ``max_waiting``: requests queued but not yet running at most; one more is refused with
    ``QueueFullError`` (bounded memory under overload). ``on_step(engine, outputs)`` runs on the
    engine thread after every step (metrics).
    """

    def __init__(self, engine: LLMEngine, *, max_waiting: int = 256,
                 on_step: StepObserver | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.on_step = on_step
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._inbox: list[Callable[[], None]] = []  # commands for the engine thread, under _wake
        self._queued = 0  # adds in the inbox: they count as waiting before the thread sees them
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="cb-lab-engine", daemon=True)
        self._thread.start()

    # ---- the caller's side (any thread, usually the event loop) ----

    async def add_request(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                          request_id: str | None = None) -> RequestStream:
        """Queue ``prompt``; returns its stream once the engine thread has taken it (it joins the
        batch at the next step). Raises what ``LLMEngine.add_request`` raises, or ``QueueFullError``."""
        (stream,) = await self.add_requests([prompt], sampling_params, [request_id])
        return stream

    async def add_requests(self, prompts: Sequence[Prompt], sampling_params: SamplingParams | None = None,
                           request_ids: Sequence[str | None] | None = None) -> list[RequestStream]:
        """Queue every prompt or none, in one command (one trip to the engine thread, however many)."""
        params = sampling_params or SamplingParams()
        loop = asyncio.get_running_loop()
        streams = [RequestStream(self, loop) for _ in prompts]
        ids = list(request_ids) if request_ids is not None else [None] * len(prompts)
        added: list[str] = await asyncio.wrap_future(self._add(list(zip(prompts, ids, streams)), params))
        for stream, request_id in zip(streams, added):
            stream.request_id = request_id
        return streams

    async def generate(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Queue ``prompt`` and yield its output as it grows (cumulative), the last one finished.
        Leaving the loop early aborts the request; ``EngineStepError`` when a step failed running it."""
        stream = await self.add_request(prompt, sampling_params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()  # a no-op once finished; else the caller left early (or was cancelled)

    def abort(self, request_id: str) -> None:
        """Abort ``request_id`` before the next step, if it is still unfinished (else nothing)."""
        self._send(lambda: self._abort(request_id))

    @property
    def num_waiting(self) -> int:
        """Samples queued but not running yet (including those the engine thread has not taken; a
        request with ``n`` samples counts ``n``)."""
        return len(self.engine.scheduler.waiting) + self._queued

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    def stop(self) -> None:
        """Ask the engine thread to stop after its current step (returns at once); callers still
        waiting get ``EngineStepError``, so their responses end now (a server shutting down)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()

    def shutdown(self) -> None:
        """``stop()``, then wait for the engine thread to end."""
        self.stop()
        self._thread.join()

    def _add(self, items: list[tuple[Prompt, str | None, RequestStream]], params: SamplingParams) -> Future[list[str]]:
        samples = len(items) * params.n  # what they add to the queue
        if samples > self.max_waiting:
            raise ValidationError(f"{len(items)} prompts x n={params.n} are {samples} samples, more than the queue "
                                  f"holds (max_waiting={self.max_waiting}); send fewer at once")
        done: Future[list[str]] = Future()
        with self._wake:
            if not self.is_running:
                raise EngineStepError("the engine has stopped and takes no request; start a new one")
            if self.num_waiting + samples > self.max_waiting:
                raise QueueFullError(f"{self.num_waiting} samples are waiting and these add {samples} "
                                     f"(max_waiting={self.max_waiting}); retry later")
            self._queued += samples
        self._send(lambda: self._take(items, params, samples, done))
        return done

    def _send(self, command: Callable[[], None]) -> None:
        with self._wake:
            self._inbox.append(command)
            self._wake.notify()

    # ---- the engine thread ----

    def _take(self, items: list[tuple[Prompt, str | None, RequestStream]], params: SamplingParams, samples: int,
              done: Future[list[str]]) -> None:
        """Add the requests, all or none; their caller gets the ids, or the error that refused one."""
        with self._wake:
            self._queued -= samples
        added: list[str] = []
        try:
            for prompt, request_id, _ in items:
                added.append(self.engine.add_request(prompt, params, request_id))
        except CBLabException as error:  # a bad request: its caller's error, not the engine's
            for request_id in added:
                self.engine.abort(request_id)
            done.set_exception(error)
            return
        self._streams |= {request_id: stream for request_id, (_, _, stream) in zip(added, items)}
        done.set_result(added)

    def _abort(self, request_id: str) -> None:
        if request_id in self.engine.outputs:  # still unfinished (it may have finished meanwhile)
            self.engine.abort(request_id)
        self._streams.pop(request_id, None)

    @property
    def is_running(self) -> bool:
        """True while the engine thread runs (a server's ``/health``)."""
        return self._thread.is_alive() and not self._stopping

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not (self._inbox or self._stopping or self.engine.has_unfinished_requests()):
                        self._wake.wait()
                    if self._stopping:
                        return
                    commands, self._inbox = self._inbox, []
                for command in commands:
                    command()
                if self.engine.has_unfinished_requests():
                    self._step()
        finally:  # stopped, or a bug ended the thread: no caller may wait forever
            for request_id, stream in self._streams.items():
                stream.put(EngineStepError(f"{request_id}: the engine stopped before it finished"))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:  # the server's fault boundary: fail the step's requests, keep serving
            self._fail_step(error)
            return
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None and not stream.put(_snapshot(out)) and not out.finished:
                self._abort(out.request_id)  # nobody can read it any more
            if out.finished:
                self._streams.pop(out.request_id, None)
        if self.on_step is not None:
            self.on_step(self.engine, outputs)

    def _fail_step(self, error: Exception) -> None:
        """A failed step changed nothing (plan, compute, commit), so the same plan would fail again:
        abort the requests it ran and give their callers the error."""
        logger.exception("a step failed; aborting the requests it ran")
        plan = self.engine.scheduler.schedule()
        ran = {r.req_id for r in plan.decode} | {c.request.req_id for c in plan.prefill}
        for request_id in sorted(ran & set(self.engine.outputs)):
            self.engine.abort(request_id)
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.put(EngineStepError(f"{request_id}: a step failed while running it "
                                           f"({type(error).__name__}: {error}); the request was aborted"))
