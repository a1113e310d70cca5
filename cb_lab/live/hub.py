"""``StepHub``: the engine thread publishes each step once; every page gets it, or a newer one.

The engine must never wait for a browser. So a step is encoded once, on the engine thread,
and handed to each subscriber's *bounded* queue without blocking: a subscriber that fell
behind (a slow page, a slow network) loses its oldest steps, and is told how many it lost,
instead of making the engine or the server's memory wait for it::

    engine thread: hub.publish(step_id, text)     # O(subscribers), a short lock each, no await
                   hub.publish_abort(text)        # requests aborted since the last step (no step may follow)
    event loop:    sub, first = hub.subscribe(loop)
                   steps, dropped, abort = await sub.next_batch(timeout)   # all that piled up, in one go

An abort is not a step (a trace file holds steps only; the next step lists the aborted requests
anyway), but an idle engine runs no next step: so the latest abort since the last step is kept
beside the window, and sent after the steps, until a step replaces it.

The hub also keeps a bounded window of the latest steps (``window`` steps; None: all of them,
for a trace file), which a page that connects late, or reconnects, is sent first, and which
``GET /trace`` returns as a trace file.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable

from cb_lab.monitoring.trace import TRACE_FORMAT

logger = logging.getLogger(__name__)

__all__ = ["Encoded", "StepHub", "Subscriber"]

Encoded = tuple[int, str]  # (step_id, the step as JSON text)


class Subscriber:
    """One page's queue: at most ``maxlen`` encoded steps; the oldest go first when it is full.

    ``offer`` runs on the engine thread and never blocks (a short lock, then at most one
    ``call_soon_threadsafe`` per batch to wake the page's event loop); ``next_batch`` runs on
    that loop and takes everything queued at once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, maxlen: int) -> None:
        assert maxlen >= 1, f"a subscriber queue holds at least one step, got {maxlen}"
        self._loop = loop
        self._lock = threading.Lock()
        self._queue: deque[Encoded] = deque(maxlen=maxlen)
        self._dropped = 0  # steps pushed out of the full queue since the last batch
        self._abort: str | None = None  # the latest abort after the queued steps (a newer step replaces it)
        self._ready = asyncio.Event()  # set on the loop when the queue has something
        self._wake_sent = False  # a wake-up is on its way: the engine sends one per batch, not one per step
        self.closed = False

    def offer(self, step: Encoded) -> bool:
        """Queue ``step`` (engine thread); False when the subscriber's loop is gone for good."""
        with self._lock:
            if len(self._queue) == self._queue.maxlen:
                self._dropped += 1
            self._queue.append(step)
            self._abort = None  # the step lists the aborts and the queues after them
            if self._wake_sent:
                return True
            self._wake_sent = True
        return self._wake()

    def offer_abort(self, text: str) -> bool:
        """Keep ``text``, the latest abort since the last step, in place of any earlier one (any thread)."""
        with self._lock:
            self._abort = text
            if self._wake_sent:
                return True
            self._wake_sent = True
        return self._wake()

    def close(self) -> None:
        """End the subscriber's stream: ``next_batch`` returns what is queued, then None (any thread)."""
        self.closed = True
        self._wake()

    def _wake(self) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the loop is closed: the page's server has stopped
            return False
        return True

    async def next_batch(self, timeout: float) -> tuple[list[Encoded], int, str | None] | None:
        """``(steps, dropped, abort)``: what was queued (oldest first), how many steps were lost to a
        full queue since the last batch, and the latest abort after those steps (or None);
        ``([], 0, None)`` after ``timeout`` seconds of silence; None once closed and empty."""
        if not self.closed:
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                return [], 0, None
        with self._lock:
            self._ready.clear()
            self._wake_sent = False
            steps, dropped, abort = list(self._queue), self._dropped, self._abort
            self._queue.clear()
            self._dropped, self._abort = 0, None
        return None if self.closed and not steps else (steps, dropped, abort)


class StepHub:
    """Fans each published step out to every subscriber and keeps the latest ``window`` steps.

    ``run_id`` names this run: a page that reconnects to a restarted server sees another
    ``run_id`` and starts over instead of mixing two runs' step ids. ``queue_size``: steps a
    subscriber may fall behind before it loses the oldest. ``on_subscribe`` is called (on the
    event loop) each time a page connects.
    """

    def __init__(self, window: int | None = 2000, queue_size: int = 256,
                 on_subscribe: Callable[[], None] | None = None) -> None:
        assert window is None or window >= 1, f"window must be >= 1 or None, got {window}"
        self.window: deque[Encoded] = deque(maxlen=window)
        self.queue_size = queue_size
        self.run_id = uuid.uuid4().hex[:8]
        self.abort: str | None = None  # the latest abort since the last step, for pages that connect later
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()
        self._on_subscribe = on_subscribe
        self.closed = False

    def publish(self, step_id: int, text: str) -> None:
        """Keep one encoded step and offer it to every subscriber (engine thread; never waits)."""
        with self._lock:
            self.window.append((step_id, text))
            self.abort = None
            subscribers = list(self._subscribers)
        self._forget([sub for sub in subscribers if not sub.offer((step_id, text))])

    def publish_abort(self, text: str) -> None:
        """Offer every subscriber the requests aborted since the last step and the queues and pool
        after them (engine thread; never waits). Not kept in the window: it is no step."""
        with self._lock:
            self.abort = text
            subscribers = list(self._subscribers)
        self._forget([sub for sub in subscribers if not sub.offer_abort(text)])

    def _forget(self, gone: list[Subscriber]) -> None:  # subscribers whose loop has closed
        for sub in gone:
            self.unsubscribe(sub)

    def subscribe(self, loop: asyncio.AbstractEventLoop, after: int | None = None,
                  backfill: int = 300) -> tuple[Subscriber, list[Encoded]]:
        """A new subscriber and the window's steps it should see first: those after step ``after``
        (a page that reconnects to the same run), else the latest ``backfill``."""
        sub = Subscriber(loop, self.queue_size)
        with self._lock:
            if self.closed:
                sub.closed = True
            self._subscribers.append(sub)
            steps = list(self.window)
            if self.abort is not None:  # sent after the first steps (the route sends those before any batch)
                sub.offer_abort(self.abort)
        if after is not None:
            steps = [step for step in steps if step[0] > after]
        first = list(itertools.islice(steps, max(len(steps) - backfill, 0), None))
        logger.debug("subscriber %d joined run %s, %d steps to catch up", id(sub), self.run_id, len(first))
        if self._on_subscribe is not None:
            self._on_subscribe()
        return sub, first

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            if sub in self._subscribers:
                self._subscribers.remove(sub)

    @property
    def num_subscribers(self) -> int:
        return len(self._subscribers)

    def close(self) -> None:
        """End every subscriber's stream (a server that stops should not wait for open pages)."""
        with self._lock:
            self.closed = True
            subscribers = list(self._subscribers)
        for sub in subscribers:
            sub.close()

    def trace_json(self) -> str:
        """The window as a trace file (``TRACE_FORMAT``: ``load_trace`` reads it; the page replays it)."""
        with self._lock:
            texts = [text for _, text in self.window]
        return '{"format": ' + json.dumps(TRACE_FORMAT) + ', "steps": [' + ", ".join(texts) + "]}"
