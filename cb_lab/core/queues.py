"""The scheduler's two queues, ``waiting`` and ``running``, both kept in arrival order.

This is vLLM's priority policy with every priority equal, so an older request is never starved
by a younger one:

- the running request that arrived last is the one preempted (the planner takes the last
  unscheduled request of ``running``);
- a preempted request waits again *ahead of* every request never admitted (preempted ones among
  themselves by arrival), and when it is admitted again it takes back its arrival place in
  ``running``, instead of becoming the latest admitted and so the next victim;
- a fork or a sample of ``SamplingParams.n`` arrives right after its parent (and its earlier
  children), so it has a place too.

The queues also keep what ``add_request`` checks a new request against (the ids and caches in
use), up to date as requests come and go, so adding one costs O(1), not a scan of every
active request.
"""

from __future__ import annotations

import itertools
from bisect import insort
from collections import Counter, deque
from collections.abc import Sequence

from cb_lab.core.kv_cache import CacheHook
from cb_lab.core.request import Request

__all__ = ["RequestQueues"]


def _own_ids(req: Request) -> list[str]:
    """A request's id and those its samples will take (``SamplingParams.n``: ``id.1``, ``id.2``, ...)."""
    n = 1 if req.sampling is None or req.parent_id is not None else req.sampling.n
    return [req.req_id] + [f"{req.req_id}.{i}" for i in range(1, n)]


class RequestQueues:
    """``waiting`` (a deque) and ``running`` (a list) in arrival order, and the ids and caches in use.

    ``cache_hooks``: what every queued request's cache calls around an append (the scheduler's cache
    plugins, a live list: plugins registered later run too).
    """

    def __init__(self, cache_hooks: Sequence[CacheHook] = ()) -> None:
        self.cache_hooks = cache_hooks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._arrival: dict[str, tuple[int, int]] = {}  # req_id -> (arrival, fork number)
        self._arrivals = itertools.count()
        self._ids: Counter[str] = Counter()  # ids in use: the active requests' and their samples' to come
        self._caches: set[int] = set()  # id() of the active requests' caches

    def is_free(self, req: Request) -> bool:
        """True when neither ``req``'s id nor its samples' ids are in use."""
        return self._ids.keys().isdisjoint(_own_ids(req))

    def id_in_use(self, req_id: str) -> bool:
        return req_id in self._ids

    def cache_in_use(self, req: Request) -> bool:
        return id(req.kv_cache) in self._caches

    def add(self, req: Request) -> None:
        """A new request: the latest arrival, never admitted, so the end of ``waiting``."""
        self._enter(req, (next(self._arrivals), 0))
        self.waiting.append(req)

    def add_child(self, parent: Request, child: Request, *, running: bool) -> None:
        """A fork (``running``) or a sample that waits: right after ``parent`` and its earlier children."""
        self._enter(child, (self._arrival[parent.req_id][0], next(self._arrivals)))
        if running:
            insort(self.running, child, key=self._running_order)
        else:
            insort(self.waiting, child, key=self._waiting_order)

    def preempt(self, req: Request) -> None:
        self.running.remove(req)
        req.preempt()  # drops its K/V; num_preemptions > 0 puts it ahead of the never admitted
        insort(self.waiting, req, key=self._waiting_order)

    def admit(self, req: Request) -> None:
        self.waiting.remove(req)
        insort(self.running, req, key=self._running_order)  # a re-admitted request takes back its place

    def remove(self, req: Request) -> None:
        """Take out a request that is still queued (an abort or a stop)."""
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._leave(req)

    def remove_finished(self) -> list[Request]:
        """Take out every finished request and return them (running ones first)."""
        finished = [r for r in self.running if r.finished]
        if finished:
            self.running = [r for r in self.running if not r.finished]
        if any(r.finished for r in self.waiting):  # zero-token requests finish straight from waiting
            finished += [r for r in self.waiting if r.finished]
            self.waiting = deque(r for r in self.waiting if not r.finished)
        for req in finished:
            self._leave(req)
        return finished

    def _enter(self, req: Request, arrival: tuple[int, int]) -> None:
        req.kv_cache.hooks = self.cache_hooks
        self._arrival[req.req_id] = arrival
        self._ids.update(_own_ids(req))
        self._caches.add(id(req.kv_cache))

    def _leave(self, req: Request) -> None:
        del self._arrival[req.req_id]
        for req_id in _own_ids(req):
            self._ids[req_id] -= 1
            if not self._ids[req_id]:
                del self._ids[req_id]  # a Counter keeps zero counts; ``in`` must not see them
        self._caches.discard(id(req.kv_cache))

    def _running_order(self, req: Request) -> tuple[int, int]:
        return self._arrival[req.req_id]

    def _waiting_order(self, req: Request) -> tuple[bool, tuple[int, int]]:
        return req.num_preemptions == 0, self._arrival[req.req_id]  # preempted ones first, then by arrival
