"""The token-budget scheduler: continuous batching in one loop.

Requests wait in ``waiting`` until the planner (``core/planner.py``) admits them into ``running``; each
step spends a budget of ``max_tokens_per_step`` rows on decode tokens and prefill chunks, and a request
that finds no free KV block preempts the running request that arrived last (``core/queues.py``).
Requests join between steps and leave the step they finish: the "continuous" in continuous batching.
``step()`` is plan, ``before_step`` hooks, compute, commit, ``after_step`` observers; nothing is written
before compute succeeds, so an exception from the model leaves every request as it was.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

from cb_lab.checks import check_choice, check_optional_int
from cb_lab.core import invariants
from cb_lab.core.block_pool import check_pool_capacity
from cb_lab.core.executor import EXECUTORS, Executor, Sampler, StepModel, check_fits_model
from cb_lab.core.kv_cache import (
    Append,
    BaseKVCache,
    PagedKVCache,
    check_rows,
    notify_appended,
    prepare_appends,
    store_appends,
)
from cb_lab.core.plan import SeqOutput, StepPlan, StepResult, StepStats
from cb_lab.core.planner import SchedulerConfig, plan_step
from cb_lab.core.prefix_cache import pool_counters, prefix_stats, register_full_blocks, step_pools
from cb_lab.core.queues import RequestQueues
from cb_lab.core.request import Request
from cb_lab.core.request_checks import check_can_finish, check_fresh, unrunnable_prefill
from cb_lab.core.view_registry import render
from cb_lab.exceptions import ConfigurationError, SchedulerError
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
        old = getattr(scheduler.config, self.name)
        setattr(scheduler.config, self.name, value)  # the config checks the value
        stuck = next((why for r in scheduler.active if (why := unrunnable_prefill(scheduler.config, r))), None)
        if stuck is not None:  # chunked prefill off, or the budget lowered under it: a request could never run
            setattr(scheduler.config, self.name, old)
            raise SchedulerError(f"{self.name}={value!r} is refused (the setting stays {old!r}): {stuck}")


@dataclass(frozen=True, slots=True)
class _Committed:
    """What a commit did beyond its plan."""
    finished: list[Request] = field(default_factory=list)
    kv_evictions: int = 0
    kv_copies: int = 0


def check_blocks(plan: StepPlan) -> None:
    """Raise MemoryError if a shared block pool cannot hold the step's new rows (the planner keeps to the
    free blocks: this guards plans made or edited by hand)."""
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
            max_tokens_per_step, prefill_chunk_size, max_num_seqs, policy, enable_chunked_prefill, preempt_every,
            check_invariants, enable_prefix_caching,
        )
        self.model = model
        if plugins is not None and not isinstance(plugins, PluginManager):
            raise ConfigurationError(f"plugins must be a PluginManager, got {type(plugins).__name__}")
        self.plugins = plugins if plugins is not None else PluginManager()
        run = EXECUTORS[check_choice("executor", executor, EXECUTORS)]  # fused: 1 forward a step; split: 1 a decode
        self.executor: Executor = run(model, sampler, self.plugins.attention_plugins)
        self.queues = RequestQueues(self.plugins.cache_plugins)  # in arrival order (core/queues.py says why)
        self.step_id = 0
        self.num_finished = 0
        self.num_preemptions = 0
        self.last_step: StepStats | None = None  # the stats (and plan) of the latest step that ran
        self._batch_size = 0  # static policy: the size of the batch now running
        # Round-robin turns: each decode takes the next number; the lowest numbers go first.
        self._decode_turn: dict[str, int] = {}
        self._next_turn = 0

    @property
    def waiting(self) -> deque[Request]:
        """Requests not running: the preempted ones, then the never admitted, each by arrival."""
        return self.queues.waiting

    @property
    def running(self) -> list[Request]:
        """Admitted requests by arrival; the last is preempted first."""
        return self.queues.running

    @property
    def active(self) -> list[Request]:
        """Every request not finished yet: running first, then waiting."""
        return [*self.running, *self.waiting]

    def add_request(self, req: Request) -> None:
        """Queue a fresh request; it takes part from the next step on."""
        if not isinstance(req, Request):
            raise SchedulerError(f"add_request takes a Request, got {type(req).__name__}")
        check_fresh(self.queues, req)
        check_fits_model(self.model, req)
        check_can_finish(self.config, req)
        self.plugins.on_request_added(req, self.step_id)  # first: a hook that raises leaves the request out
        self.queues.add(req)
        logger.debug("added %r", req)

    def fork(self, req_id: str, new_req_id: str, sampling: SamplingParams | None = None) -> Request:
        """Fork the running decode request ``req_id`` (``Request.fork``): the child shares its K/V
        blocks, copy-on-write, runs from the next step and is returned (one more running request: not
        past ``max_num_seqs``)."""
        parent = next((r for r in self.running if r.req_id == req_id and r.in_decode), None)
        if parent is None:
            decoding = [r.req_id for r in self.running if r.in_decode]
            raise SchedulerError(f"no running request {req_id!r} in decode to fork; decoding: {decoding}")
        if self.queues.id_in_use(new_req_id):
            raise SchedulerError(f"request id {new_req_id!r} is already used; give the fork a unique id")
        if self.max_num_seqs is not None and len(self.running) >= self.max_num_seqs:
            raise SchedulerError(f"{len(self.running)} requests run, max_num_seqs={self.max_num_seqs}: no room to fork "
                                 f"{req_id!r}; raise max_num_seqs or fork after a request finishes")
        child = parent.fork(new_req_id, sampling)
        with ExitStack() as undo:  # first, as in add_request: a hook that raises leaves the fork out,
            undo.callback(child.kv_cache.release)  # its shared blocks its parent's alone again
            self.plugins.on_request_added(child, self.step_id)
            undo.pop_all()  # the hook took it: keep the blocks
        self._queue_fork(parent, child)
        return child

    def _queue_fork(self, parent: Request, child: Request) -> Request:
        self.queues.add_child(parent, child, running=True)
        logger.debug("forked %r from %r", child, parent)
        return child

    def _fork_samples(self, req: Request) -> list[Request]:
        """``SamplingParams.n``: once a request has drawn its first token, fork its other samples. As many
        as ``max_num_seqs`` leaves room for run at once, sharing the prompt's blocks; the others wait (after
        their parent) as fresh requests over the prompt, admitted as requests leave (prefix caching finds
        the prompt's blocks). A sample draws the same tokens either way: its own params and random stream."""
        params = req.sampling
        if params is None or params.n == 1 or req.parent_id is not None or len(req.generated_tokens) != 1:
            return []
        running = sum(not r.finished for r in self.running)  # those finishing this step leave
        room = params.n - 1 if self.max_num_seqs is None else max(self.max_num_seqs - running, 0)
        samples = [(f"{req.req_id}.{i}", params.sample_params(i)) for i in range(1, params.n)]
        forks = [self._queue_fork(req, req.fork(child_id, sampling)) for child_id, sampling in samples[:room]]
        waiting = [req.new_sample(child_id, sampling) for child_id, sampling in samples[room:]]
        for child in waiting:  # in sample order, before the requests that arrived after their parent
            self.queues.add_child(req, child, running=False)
        return forks + waiting

    def abort(self, req_id: str) -> Request:
        """Remove a waiting or running request at once and free its KV memory."""
        return self.finish_request(req_id, "abort")

    def finish_request(self, req_id: str, finish_reason: str) -> Request:
        """End a waiting or running request now and free its KV memory (vLLM's ``finish_requests``):
        ``"abort"``, or ``"stop"`` when its caller found a stop string in its text; a stop counts as a
        finished request (``on_request_completion`` fires), an abort does not (``on_request_aborted``)."""
        if finish_reason not in ("abort", "stop"):
            raise SchedulerError(f"finish_reason must be 'abort' or 'stop', got {finish_reason!r}")
        req = next((r for r in self.active if r.req_id == req_id), None)
        if req is None:
            raise SchedulerError(f"no active request {req_id!r} to {finish_reason}; active: "
                                 f"{[r.req_id for r in self.active]}")
        self.queues.remove(req)
        req.kv_cache.release()
        req.aborted, req.finished, req.finish_reason = finish_reason == "abort", True, finish_reason
        self._decode_turn.pop(req_id, None)
        logger.info("%s %r", "aborted" if req.aborted else "stopped", req)
        if req.aborted:
            self.plugins.on_request_aborted(req)
        else:
            self.num_finished += 1
            self.plugins.on_request_completion(req)
        return req

    def step(self) -> StepStats:
        """Run one step and return its stats (a dict; ``.plan`` is the plan it ran)."""
        if not (self.running or self.waiting):
            return self._stats(StepPlan(self.step_id, (), ()), _Committed(), 0.0, "no_active_requests")
        start = time.perf_counter()
        plan = self.schedule()
        self.plugins.before_step(plan)
        result = self.executor.run(plan)
        done = self._commit(plan, result)
        if self.check_invariants:
            invariants.check_invariants(self, plan, done.finished)
        self.last_step = stats = self._stats(plan, done, time.perf_counter() - start)
        self.plugins.after_step(stats)
        return stats

    def schedule(self) -> StepPlan:
        """Decide this step's decodes, prefill chunks, admissions and preemptions. Changes nothing."""
        every = self.preempt_every
        force = every is not None and (self.step_id + 1) % every == 0
        return plan_step(self.step_id, self.config, self.running, self.waiting, self._decode_turn, force)

    def commit(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Write a computed step into the requests; returns the requests it finished. A hand-made plan and
        result are checked first (this step's, the queues as they are, the outputs' rows, the free blocks:
        ``check_blocks``): one that does not fit raises, writing nothing."""
        self._check_plan(plan, result)
        check_blocks(plan)
        return self._commit(plan, result).finished

    def _check_plan(self, plan: StepPlan, result: StepResult) -> None:
        """A hand-made plan and result fit the scheduler as it is, so the writes cannot fail half way."""
        running, waiting = set(map(id, self.running)), set(map(id, self.waiting))
        queued = (all(id(r) in running for r in [*plan.decode, *plan.preempted])
                  and all(id(r) in waiting for r in plan.admitted)
                  and all(id(c.request) in running or c.request in plan.admitted for c in plan.prefill))
        problem = None
        if plan.step_id != self.step_id:
            problem = f"it is for step {plan.step_id}, the scheduler is at step {self.step_id}"
        elif not queued:
            problem = "a request it runs, preempts or admits is not in the queue that needs"
        elif len(result.prefill) != len(plan.prefill) or len(result.decode) != len(plan.decode):
            problem = "the result's outputs do not match its chunks and decodes"
        if problem is not None:
            raise SchedulerError(f"cannot commit this plan: {problem}; plan each step with schedule() and commit it "
                                 "once, with the executor's result")
        rows = [c.length for c in plan.prefill] + [1] * len(plan.decode)
        for req, out, n in zip(plan.requests, [*result.prefill, *result.decode], rows, strict=True):
            check_rows(out.k, out.v, self.model.kv_dim, self.model.device, f"request {req.req_id!r}", n)

    def _commit(self, plan: StepPlan, result: StepResult) -> _Committed:
        """Three phases, so that a fault changes nothing or lets the step finish (the planner booked the blocks)."""
        # 1. The hooks that may refuse or rewrite rows (before_append), and their checks: no writes.
        requests = plan.requests
        outputs = result.prefill + result.decode
        appends = [(req.kv_cache, out.k, out.v) for req, out in zip(requests, outputs, strict=True)]
        prepared = prepare_appends(appends, checked=True)  # the executor checked the step's K/V
        # 2. The writes, which cannot fail. The pools count their own evictions and copies.
        pools = step_pools(plan)
        evictions, copies = pool_counters(pools)
        self._requeue(plan)
        stored = self._store(plan, prepared)
        forks = self._record(plan, requests, outputs)
        finished = self._retire(plan.step_id)
        evictions_after, copies_after = pool_counters(pools)
        # 3. The observers, which see the step committed.
        notify_appended(prepared, stored)
        for child in forks:
            self.plugins.on_request_added(child, self.step_id)
        for req in finished:
            self.plugins.on_request_completion(req)
        return _Committed(finished, evictions_after - evictions, copies_after - copies)

    def _requeue(self, plan: StepPlan) -> None:
        """Preempted requests wait again and admitted ones run, each in its arrival place."""
        for req in plan.preempted:  # first: the step's appends may need the blocks they free
            self.queues.preempt(req)
            self.num_preemptions += 1
            logger.info("step %d preempted %r", plan.step_id, req)
        if self.policy != "static" or (plan.admitted and not self.running):  # (static) a new batch starts
            self._batch_size = 0
        for req in plan.admitted:
            self.queues.admit(req)
        self._batch_size = max(self._batch_size, len(self.running))  # static: its slots (forks join it)

    def _store(self, plan: StepPlan, prepared: list[Append]) -> list[int]:
        """The step's K/V rows into the caches; returns the bytes each append took."""
        for chunk in plan.prefill:  # prefix-cache hits first: no allocation below may evict their blocks
            if chunk.cached_blocks:
                cast(PagedKVCache, chunk.request.kv_cache).adopt(chunk.cached_blocks)
        stored = store_appends(prepared)
        for chunk in plan.prefill:
            chunk.request.prefill_pos = chunk.end
        if self.enable_prefix_caching:
            register_full_blocks(plan.prefill)
        return stored

    def _record(self, plan: StepPlan, requests: list[Request], outputs: tuple[SeqOutput, ...]) -> list[Request]:
        """The step's tokens and logprobs into the requests; returns the samples it forked."""
        for req, out in zip(requests, outputs):
            if out.prompt_logprobs is not None:
                req.prompt_logprobs.append(out.prompt_logprobs)
            if out.token is not None:
                req.record_token(out.token, out.logprobs)  # the executor made it: [dim] or a 0-d id
        for req in plan.decode:
            self._decode_turn[req.req_id] = self._next_turn
            self._next_turn += 1
        return [child for c in plan.prefill if c.completes_prompt for child in self._fork_samples(c.request)]

    def _retire(self, step_id: int) -> list[Request]:
        """Finished requests leave the queues; a shared pool gets their blocks back at once."""
        finished = self.queues.remove_finished()
        self.step_id = step_id + 1
        self.num_finished += len(finished)
        for req in finished:
            self._decode_turn.pop(req.req_id, None)
            if req.kv_cache.shared_pool is not None:
                req.kv_cache.release()  # the others can use the blocks now; a private cache stays readable
            logger.debug("step %d finished %r", step_id, req)
        return finished

    def _stats(self, plan: StepPlan, done: _Committed, duration: float, status: str = "completed") -> StepStats:
        """A step's figures, all built here: from its plan, what its commit did, and the queues after it."""
        return StepStats({
            "step_id": plan.step_id,
            "decode_tokens": plan.num_decode_tokens,
            "prefill_tokens": plan.num_prefill_tokens,
            "total_tokens": plan.total_tokens,
            "active_requests": len(self.running) + len(self.waiting),
            "waiting_requests": len(self.waiting),
            "finished_requests": len(done.finished),
            "preempted_requests": len(plan.preempted),
            "padding_tokens": self._padding(plan),
            "step_duration": duration,
            "status": status,
            **prefix_stats(plan),  # what admissions took from the prefix cache, out of their prefills
            "kv_evictions": done.kv_evictions,  # cached blocks the step's allocations evicted
            "kv_copies": done.kv_copies,  # copy-on-write copies its writes made
        }, plan if status == "completed" else None)

    def _padding(self, plan: StepPlan) -> int:
        """Static batching pads finished requests' slots until the whole batch is done."""
        if self.policy != "static" or plan.prefill or not plan.decode:
            return 0
        return self._batch_size - len(plan.decode)

    def run_until_complete(self, max_steps: int | None = None) -> list[StepStats]:
        """Step until no request is active; returns every step's stats."""
        history: list[StepStats] = []
        limit = check_optional_int("max_steps", max_steps, 0, SchedulerError)
        while (self.running or self.waiting) and (limit is None or len(history) < limit):
            history.append(self.step())
        return history

    def __repr__(self) -> str:
        waiting = f", waiting={len(self.waiting)}" if self.waiting else ""
        return (f"Scheduler(step={self.step_id}, active={len(self.active)}{waiting}, finished={self.num_finished}, "
                f"budget={self.max_tokens_per_step}, chunk={self.prefill_chunk_size})")

    def _repr_html_(self) -> str:
        return render(self)
