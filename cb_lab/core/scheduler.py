"""The token-budget scheduler: continuous batching in one loop.

Requests wait in a queue (``waiting``) until the scheduler admits them into ``running``.
Every step has a budget of ``max_tokens_per_step`` tokens; with the default policy it
is spent in this order (``core/planner.py`` has the others):

1. **decode first**: one token for every running request that has finished its prefill
   (if a lowered budget leaves room for fewer, they take turns: round robin);
2. **prefill**: running requests' prompt chunks of at most ``prefill_chunk_size`` rows;
3. **admission**: waiting requests join, first come first served, while the budget,
   ``max_num_seqs`` and the KV blocks of a shared pool allow.

A decode or prefill chunk that finds no free block preempts the running request that
arrived last (vLLM's recompute preemption; its priority policy with equal priorities).
Requests join between steps and leave the step they finish, so the batch is re-formed every
step: the "continuous" in continuous batching::

    plan   = self.schedule()            # pure: reads state, decides
    result = self.executor.run(plan)    # compute only: model forward(s)
    self.commit(plan, result)           # preempt, admit, append K/V, record tokens, finish

Nothing is written before compute succeeds, so an exception from the model leaves
every request as it was and the next ``step()`` simply retries. Compute runs on one of
two executors (``core/executor.py``): ``"fused"`` (one forward per step, the default) or
``"split"`` (one forward for the prefill chunks plus one per decode token).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from bisect import insort
from collections import deque
from typing import Generic, TypeVar, cast

from cb_lab.core import invariants
from cb_lab.core.executor import EXECUTORS, Executor, Sampler, StepModel
from cb_lab.core.kv_cache import (
    Append,
    BaseKVCache,
    PagedKVCache,
    check_pool_capacity,
    notify_appended,
    prepare_appends,
    same_device,
    store_appends,
)
from cb_lab.core.plan import SeqOutput, StepPlan, StepResult, StepStats
from cb_lab.core.planner import SchedulerConfig, plan_step
from cb_lab.core.prefix_cache import pool_counters, prefix_stats, register_full_blocks
from cb_lab.core.request import Request
from cb_lab.exceptions import SchedulerError
from cb_lab.plugins.base import PluginManager
from cb_lab.sampling import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["Scheduler", "SchedulerConfig", "check_blocks"]

T = TypeVar("T")


class _Setting(Generic[T]):
    """A scheduler setting: kept, and checked, in ``scheduler.config``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, scheduler: Scheduler, owner: type | None = None) -> T:
        return cast(T, getattr(scheduler.config, self.name))

    def __set__(self, scheduler: Scheduler, value: T) -> None:
        setattr(scheduler.config, self.name, value)


def _tokens(shape: tuple[int, ...]) -> str:
    return f"dim {shape[0]}" if shape else "token ids"


def _ids(req: Request) -> set[str]:
    """A request's id and those its samples will take (``SamplingParams.n``: ``id.1``, ``id.2``, ...)."""
    n = 1 if req.sampling is None or req.parent_id is not None else req.sampling.n
    return {req.req_id} | {f"{req.req_id}.{i}" for i in range(1, n)}


def check_blocks(plan: StepPlan) -> None:
    """Raise MemoryError if a shared block pool cannot hold the step's new rows.

    The planner already keeps to the free blocks; this guards plans built or edited by hand.
    """
    rows: list[tuple[BaseKVCache, int]] = [(c.request.kv_cache, c.length) for c in plan.prefill]
    check_pool_capacity(
        rows + [(r.kv_cache, 1) for r in plan.decode], f"step {plan.step_id}",
        released=[r.kv_cache for r in plan.preempted],
        adopted=[(c.request.kv_cache, c.cached_blocks) for c in plan.prefill],
    )


class Scheduler:
    """Mixes decode tokens and prefill chunks under a per-step token budget.

    The settings are checked once, into ``config`` (a :class:`SchedulerConfig`, whose fields say
    what each does); ``scheduler.max_num_seqs`` and the like read and set them there.
    ``sampler`` maps an output row to the token recorded and fed back (identity when None;
    ``torch.tanh`` is a fun one); ``plugins`` wires scheduler, attention and cache plugins.
    ``check_invariants=None`` is on when ``CB_LAB_CHECK_INVARIANTS=1`` (the test suite sets it).
    """

    max_tokens_per_step = _Setting[int]()  # may change between steps, like every setting below
    prefill_chunk_size = _Setting[int]()
    max_num_seqs = _Setting[int | None]()
    policy = _Setting[str]()
    enable_chunked_prefill = _Setting[bool]()
    preempt_every = _Setting[int | None]()
    check_invariants = _Setting[bool]()
    enable_prefix_caching = _Setting[bool]()

    def __init__(
        self,
        model: StepModel,
        max_tokens_per_step: int = 8,
        prefill_chunk_size: int = 4,
        *,
        sampler: Sampler | None = None,
        plugins: PluginManager | None = None,
        executor: str = "fused",
        max_num_seqs: int | None = None,
        policy: str = "decode_first",
        enable_chunked_prefill: bool = True,
        preempt_every: int | None = None,
        check_invariants: bool | None = None,
        enable_prefix_caching: bool = False,
    ) -> None:
        if check_invariants is None:  # the test suite turns the debug mode on for every scheduler
            check_invariants = os.environ.get("CB_LAB_CHECK_INVARIANTS") == "1"
        self.config = SchedulerConfig(
            max_tokens_per_step, prefill_chunk_size, executor, max_num_seqs, policy, enable_chunked_prefill,
            preempt_every, check_invariants, enable_prefix_caching,
        )
        self.model = model
        self.plugins = plugins if plugins is not None else PluginManager()
        self.executor: Executor = EXECUTORS[executor](model, sampler, self.plugins.attention_plugins)
        # Both queues keep arrival order, so an older request is never starved by a younger one: the
        # running request that arrived last is the victim, and a preempted request rejoins the waiting
        # queue ahead of the never-admitted ones (vLLM's priority policy with equal priorities).
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._arrival: dict[str, tuple[int, int]] = {}  # req_id -> (arrival, fork number); forks follow their parent
        self._arrivals = itertools.count()
        self.step_id = 0
        self.num_finished = 0
        self.num_preemptions = 0
        self.last_step: StepStats | None = None  # the stats (and plan) of the latest step that ran
        self._batch_size = 0  # static policy: the size of the batch now running
        # Round-robin turns: each decode takes the next number; the lowest numbers go first.
        self._decode_turn: dict[str, int] = {}
        self._next_turn = 0

    @property
    def active(self) -> list[Request]:
        """Every request not finished yet: running first, then waiting."""
        return [*self.running, *self.waiting]

    def add_request(self, req: Request) -> None:
        """Queue a fresh request; it takes part from the next step on."""
        if not isinstance(req, Request):
            raise SchedulerError(f"add_request takes a Request, got {type(req).__name__}")
        if any(_ids(req) & _ids(r) for r in self.active):
            raise SchedulerError(f"request id {req.req_id!r} (or a sample of it) is already active; use a unique "
                                 "req_id")
        model = self.model
        if req.token_shape != model.token_shape or req.kv_cache.dim not in (None, model.kv_dim):
            raise SchedulerError(
                f"request {req.req_id!r} has {_tokens(req.token_shape)} (cache dim {req.kv_cache.dim}) but the model "
                f"has {_tokens(model.token_shape)} (cache dim {model.kv_dim})"
            )
        if req.parent_id is not None:
            raise SchedulerError(f"request {req.req_id!r} names parent {req.parent_id!r}; Scheduler.fork adds forks")
        if req.prefill_pos != 0 or req.generated_tokens or len(req.kv_cache) != 0:
            raise SchedulerError(f"request {req.req_id!r} has already run ({req!r}); add a new Request")
        if any(r.kv_cache is req.kv_cache for r in self.active):
            raise SchedulerError(f"request {req.req_id!r} shares its kv_cache with an active request; give it its own")
        device = self.model.device
        if not (same_device(req.prompt.device, device) and same_device(req.kv_cache.device, device)):
            raise SchedulerError(
                f"request {req.req_id!r} (prompt on {req.prompt.device}, cache on {req.kv_cache.device}) "
                f"must be on the model's device {self.model.device}"
            )
        if req.dim and req.prompt.dtype != self.model.dtype:
            raise SchedulerError(
                f"request {req.req_id!r} has a {req.prompt.dtype} prompt but the model computes in "
                f"{self.model.dtype}; pass prompt.to({self.model.dtype})"
            )
        self._check_it_can_finish(req)
        self.plugins.on_request_added(req, self.step_id)  # first: a hook that raises leaves the request out
        req.kv_cache.hooks = self.plugins.cache_plugins  # live: plugins registered later run too
        self._arrival[req.req_id] = (next(self._arrivals), 0)
        self.waiting.append(req)  # the latest arrival, never admitted: the end of the queue
        logger.debug("added %r", req)

    def _check_it_can_finish(self, req: Request) -> None:
        rows = req.prompt_len + max(req.max_new_tokens - 1, 0)  # its longest prefill (after a preemption)
        if not self.enable_chunked_prefill and rows > self.max_tokens_per_step:
            raise SchedulerError(
                f"request {req.req_id!r} may need a {rows}-row prefill but chunked prefill is off and the budget is "
                f"{self.max_tokens_per_step}; raise max_tokens_per_step or enable chunked prefill"
            )
        cache = req.kv_cache
        if isinstance(cache, PagedKVCache) and cache.shares_pool and cache.pool is not None:
            blocks = cache.blocks_needed(rows)
            if blocks > cache.pool.num_blocks and not cache.pool.growable:
                raise SchedulerError(
                    f"request {req.req_id!r} needs {blocks} KV blocks but its pool has {cache.pool.num_blocks} in all; "
                    "give the BlockPool more num_blocks"
                )

    def fork(self, req_id: str, new_req_id: str, sampling: SamplingParams | None = None) -> Request:
        """Fork the running decode request ``req_id`` (``Request.fork``): the child shares its K/V
        blocks, copy-on-write, runs from the next step and is returned."""
        parent = next((r for r in self.running if r.req_id == req_id and r.in_decode), None)
        if parent is None:
            decoding = [r.req_id for r in self.running if r.in_decode]
            raise SchedulerError(f"no running request {req_id!r} in decode to fork; decoding: {decoding}")
        if any(new_req_id in _ids(r) for r in self.active):
            raise SchedulerError(f"request id {new_req_id!r} is already used; give the fork a unique id")
        child = self._fork(parent, new_req_id, sampling)
        self.plugins.on_request_added(child, self.step_id)
        return child

    def _fork(self, parent: Request, new_req_id: str, sampling: SamplingParams | None) -> Request:
        child = self._child(parent, parent.fork(new_req_id, sampling))
        insort(self.running, child, key=self._running_order)
        logger.debug("forked %r from %r", child, parent)
        return child

    def _fork_samples(self, req: Request) -> list[Request]:
        """``SamplingParams.n``: once a request has drawn its first token, fork its other samples.

        As many as ``max_num_seqs`` leaves room for run at once, sharing the prompt's blocks; the
        others wait (right after their parent's place in the queue) as fresh requests over the same
        prompt (an empty fork of the cache) and are admitted as requests leave, their prompt's full
        blocks found by prefix caching. A sample draws the same tokens either way: its own params,
        its own random stream.
        """
        params = req.sampling
        if params is None or params.n == 1 or req.parent_id is not None or len(req.generated_tokens) != 1:
            return []
        running = sum(not r.finished for r in self.running)  # those finishing this step leave
        room = params.n - 1 if self.max_num_seqs is None else max(self.max_num_seqs - running, 0)
        samples = [(f"{req.req_id}.{i}", params.sample_params(i)) for i in range(1, params.n)]
        forks = [self._fork(req, child_id, sampling) for child_id, sampling in samples[:room]]
        waiting = [self._child(req, req.new_sample(child_id, sampling)) for child_id, sampling in samples[room:]]
        for child in waiting:  # in sample order, before the requests that arrived after their parent
            insort(self.waiting, child, key=self._waiting_order)
        return forks + waiting

    def _child(self, parent: Request, child: Request) -> Request:
        """A fork or sample of ``parent``: it arrives right after its parent (and its earlier children)."""
        child.kv_cache.hooks = self.plugins.cache_plugins
        self._arrival[child.req_id] = (self._arrival[parent.req_id][0], next(self._arrivals))
        return child

    def _running_order(self, req: Request) -> tuple[int, int]:
        return self._arrival[req.req_id]

    def _waiting_order(self, req: Request) -> tuple[bool, tuple[int, int]]:
        return req.num_preemptions == 0, self._arrival[req.req_id]  # preempted ones first, then arrival

    def abort(self, req_id: str) -> Request:
        """Remove a waiting or running request at once and free its KV memory."""
        return self.finish_request(req_id, "abort")

    def finish_request(self, req_id: str, finish_reason: str) -> Request:
        """End a waiting or running request now and free its KV memory (vLLM's ``finish_requests``):
        ``"abort"``, or ``"stop"`` when its caller found a stop string in its text; a stop counts as a
        finished request (``on_request_completion`` fires), an abort does not."""
        if finish_reason not in ("abort", "stop"):
            raise SchedulerError(f"finish_reason must be 'abort' or 'stop', got {finish_reason!r}")
        req = next((r for r in self.active if r.req_id == req_id), None)
        if req is None:
            raise SchedulerError(f"no active request {req_id!r} to {finish_reason}; active: "
                                 f"{[r.req_id for r in self.active]}")
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        req.kv_cache.release()
        req.aborted, req.finished, req.finish_reason = finish_reason == "abort", True, finish_reason
        self._decode_turn.pop(req_id, None)
        self._arrival.pop(req_id, None)
        logger.info("%s %r", "aborted" if req.aborted else "stopped", req)
        if not req.aborted:
            self.num_finished += 1
            self.plugins.on_request_completion(req)
        return req

    def step(self) -> StepStats:
        """Run one step (plan, compute, commit) and return its stats (a dict; ``.plan`` is the plan it ran)."""
        if not self.active:
            return self._stats(self.step_id, 0, 0, 0, 0.0, "no_active_requests")
        start = time.perf_counter()
        plan = self.schedule()
        self.plugins.before_step(plan)
        result = self.executor.run(plan)
        evictions, copies = pool_counters(plan)
        finished = self.commit(plan, result)
        if self.check_invariants:
            invariants.check_invariants(self, plan, finished)
        stats = self._stats(
            plan.step_id, plan.num_decode_tokens, plan.num_prefill_tokens, len(finished),
            time.perf_counter() - start, "completed", len(plan.preempted), self._padding(plan), plan,
        )
        stats |= prefix_stats(plan)
        evictions_after, copies_after = pool_counters(plan)
        stats["kv_evictions"], stats["kv_copies"] = evictions_after - evictions, copies_after - copies
        self.last_step = stats
        self.plugins.after_step(stats)
        return stats

    def schedule(self) -> StepPlan:
        """Decide this step's decodes, prefill chunks, admissions and preemptions. Changes nothing."""
        every = self.preempt_every
        force = every is not None and (self.step_id + 1) % every == 0
        return plan_step(self.step_id, self.config, self.running, self.waiting, self._decode_turn, force)

    def _padding(self, plan: StepPlan) -> int:
        """Static batching pads finished requests' slots until the whole batch is done."""
        if self.policy != "static" or plan.prefill or not plan.decode:
            return 0
        return self._batch_size - len(plan.decode)

    def commit(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Write a computed step into the requests; returns the requests it finished.

        Three phases, so that a fault changes nothing or lets the step finish: first every check
        and every hook that may refuse or rewrite rows (``before_append``), which write nothing;
        then the writes, which cannot fail; then the observers (``after_append``,
        ``on_request_added`` of the step's forks, ``on_request_completion``), which see the step
        committed.
        """
        check_blocks(plan)  # a plan the pool cannot hold changes nothing
        requests = [chunk.request for chunk in plan.prefill] + list(plan.decode)
        outputs = result.prefill + result.decode
        prepared = prepare_appends([(req.kv_cache, out.k, out.v) for req, out in zip(requests, outputs, strict=True)])
        stored, finished, forks = self._write(plan, requests, outputs, prepared)
        notify_appended(prepared, stored)
        for child in forks:
            self.plugins.on_request_added(child, self.step_id)
        for req in finished:
            self.plugins.on_request_completion(req)
        return finished

    def _write(
        self, plan: StepPlan, requests: list[Request], outputs: tuple[SeqOutput, ...], prepared: list[Append]
    ) -> tuple[list[int], list[Request], list[Request]]:
        """Every write of a commit, in order; its inputs were all checked before."""
        for req in plan.preempted:  # first: the step's appends may need the blocks they free
            self.running.remove(req)
            req.preempt()
            insort(self.waiting, req, key=self._waiting_order)
            self.num_preemptions += 1
            logger.info("step %d preempted %r", plan.step_id, req)
        if plan.admitted and not self.running:
            self._batch_size = len(plan.admitted)
        for req in plan.admitted:
            self.waiting.remove(req)
            insort(self.running, req, key=self._running_order)  # a re-admitted request takes back its place
        for chunk in plan.prefill:  # prefix-cache hits first: no allocation below may evict their blocks
            if chunk.cached_blocks:
                cast(PagedKVCache, chunk.request.kv_cache).adopt(chunk.cached_blocks)
        stored = store_appends(prepared)
        for chunk in plan.prefill:
            chunk.request.prefill_pos = chunk.end
        if self.enable_prefix_caching:
            register_full_blocks(plan.prefill)
        for req, out in zip(requests, outputs):
            if out.prompt_logprobs is not None:
                req.prompt_logprobs.append(out.prompt_logprobs)
            if out.token is not None:
                req.append_token(out.token, out.logprobs)
        forks = [child for c in plan.prefill if c.completes_prompt for child in self._fork_samples(c.request)]
        for req in plan.decode:
            self._decode_turn[req.req_id] = self._next_turn
            self._next_turn += 1
        finished = [r for r in self.active if r.finished]  # zero-token requests finish straight from waiting
        self.running = [r for r in self.running if not r.finished]
        self.waiting = deque(r for r in self.waiting if not r.finished)
        self.step_id = plan.step_id + 1
        self.num_finished += len(finished)
        for req in finished:
            self._decode_turn.pop(req.req_id, None)
            self._arrival.pop(req.req_id, None)
            if isinstance(req.kv_cache, PagedKVCache) and req.kv_cache.shares_pool:
                req.kv_cache.release()  # a shared pool's blocks go back at once; private caches stay readable
            logger.debug("step %d finished %r", plan.step_id, req)
        return stored, finished, forks

    def _stats(
        self, step_id: int, decode: int, prefill: int, finished: int, duration: float, status: str,
        preempted: int = 0, padding: int = 0, plan: StepPlan | None = None,
    ) -> StepStats:
        return StepStats({
            "step_id": step_id,
            "decode_tokens": decode,
            "prefill_tokens": prefill,
            "total_tokens": decode + prefill,
            "active_requests": len(self.running) + len(self.waiting),
            "waiting_requests": len(self.waiting),
            "finished_requests": finished,
            "preempted_requests": preempted,
            "padding_tokens": padding,
            "step_duration": duration,
            "status": status,
            "prefix_hit_tokens": 0,  # prefill rows admissions took from cached blocks instead of computing
            "prefix_hit_blocks": 0,  # ... and the cached blocks that hold them
            "admitted_prompt_tokens": 0,  # prefill rows of the requests admitted in the step
            "admitted_prompt_blocks": 0,  # ... and their full blocks (what a hit could at most save)
            "kv_evictions": 0,  # cached blocks the step's allocations evicted
            "kv_copies": 0,  # copy-on-write copies the step's writes made
        }, plan)

    def run_until_complete(self, max_steps: int | None = None) -> list[StepStats]:
        """Step until no request is active; returns every step's stats."""
        history: list[StepStats] = []
        while self.active and (max_steps is None or len(history) < max_steps):
            history.append(self.step())
        return history

    def __repr__(self) -> str:
        waiting = f", waiting={len(self.waiting)}" if self.waiting else ""
        return (
            f"Scheduler(step={self.step_id}, active={len(self.active)}{waiting}, finished={self.num_finished}, "
            f"budget={self.max_tokens_per_step}, chunk={self.prefill_chunk_size})"
        )

    def _repr_html_(self) -> str:
        from cb_lab.display.views import scheduler_html  # the views import the core: imported on use

        return scheduler_html(self)
