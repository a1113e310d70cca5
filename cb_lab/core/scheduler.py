"""The token-budget scheduler: continuous batching in one loop.

Every step has a budget of ``max_tokens_per_step`` tokens, spent in this order:

1. **decode first**: one token for every request that has finished its prompt
   (if a lowered budget leaves room for fewer, they take turns: round robin);
2. **prefill** fills what is left, in arrival order, one chunk of at most
   ``prefill_chunk_size`` prompt rows per request.

Requests join between steps and leave the step they finish, so the batch is
re-formed every step: that is the "continuous" in continuous batching. A step is::

    plan   = self.schedule()            # pure: reads state, decides
    result = self.executor.run(plan)    # compute only: model forward(s)
    self.commit(plan, result)           # append K/V, advance prefill, record tokens, finish

Nothing is written before compute succeeds, so an exception from the model leaves
every request as it was and the next ``step()`` simply retries. Compute runs on one of
two executors (``core/executor.py``): ``"fused"`` (one forward per step, the default) or
``"split"`` (one forward for the prefill chunks plus one per decode token).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from cb_lab.core.executor import Executor, FusedExecutor, Sampler, SplitExecutor, StepModel
from cb_lab.core.kv_cache import BaseKVCache, PagedKVCache, append_batch, same_device
from cb_lab.core.plan import PrefillChunk, StepPlan, StepResult
from cb_lab.core.request import Request
from cb_lab.exceptions import ConfigurationError, SchedulerError
from cb_lab.exceptions import MemoryError as CBLabMemoryError
from cb_lab.plugins.base import PluginManager

logger = logging.getLogger(__name__)

__all__ = ["EXECUTORS", "Scheduler", "check_blocks"]

EXECUTORS: dict[str, type[Executor]] = {"fused": FusedExecutor, "split": SplitExecutor}


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_blocks(plan: StepPlan) -> None:
    """Raise MemoryError before compute if a shared block pool cannot hold the step's new rows."""
    needed: dict[int, int] = {}
    pools = {}
    rows: list[tuple[BaseKVCache, int]] = [(c.request.kv_cache, c.length) for c in plan.prefill]
    rows += [(r.kv_cache, 1) for r in plan.decode]
    for cache, n in rows:
        if isinstance(cache, PagedKVCache) and cache.shares_pool and cache.pool is not None:
            pools[id(cache.pool)] = cache.pool
            needed[id(cache.pool)] = needed.get(id(cache.pool), 0) + cache.blocks_needed(n)
    for key, n in needed.items():
        if not pools[key].can_allocate(n):
            raise CBLabMemoryError(
                f"step {plan.step_id} needs {n} new KV blocks but the shared pool has {pools[key].num_free_blocks} "
                "free; give the BlockPool more num_blocks or add fewer requests at once"
            )


class Scheduler:
    """Mixes decode tokens and prefill chunks under a per-step token budget.

    ``sampler`` maps an output row to the token recorded and fed back (identity when
    None; ``torch.tanh`` is a fun one). ``plugins`` wires scheduler, attention and cache
    plugins. ``executor`` is ``"fused"`` or ``"split"`` (same numbers, different speed).
    Both budgets may be changed between steps.
    """

    def __init__(
        self,
        model: StepModel,
        max_tokens_per_step: int = 8,
        prefill_chunk_size: int = 4,
        *,
        sampler: Sampler | None = None,
        plugins: PluginManager | None = None,
        executor: str = "fused",
    ) -> None:
        if executor not in EXECUTORS:
            raise ConfigurationError(f"executor must be one of {sorted(EXECUTORS)}, got {executor!r}")
        self.model = model
        self.max_tokens_per_step = max_tokens_per_step
        self.prefill_chunk_size = prefill_chunk_size
        self.plugins = plugins if plugins is not None else PluginManager()
        self.executor: Executor = EXECUTORS[executor](model, sampler, self.plugins.attention_plugins)
        self.active: list[Request] = []  # arrival order
        self.step_id = 0
        self.num_finished = 0
        # Round-robin turns: each decode takes the next number; the lowest numbers go first.
        self._decode_turn: dict[str, int] = {}
        self._next_turn = 0

    @property
    def max_tokens_per_step(self) -> int:
        return self._max_tokens_per_step

    @max_tokens_per_step.setter
    def max_tokens_per_step(self, value: int) -> None:
        self._max_tokens_per_step = _positive_int("max_tokens_per_step", value)

    @property
    def prefill_chunk_size(self) -> int:
        return self._prefill_chunk_size

    @prefill_chunk_size.setter
    def prefill_chunk_size(self, value: int) -> None:
        self._prefill_chunk_size = _positive_int("prefill_chunk_size", value)

    def add_request(self, req: Request) -> None:
        """Queue a fresh request; it takes part from the next step on."""
        if not isinstance(req, Request):
            raise SchedulerError(f"add_request takes a Request, got {type(req).__name__}")
        if any(r.req_id == req.req_id for r in self.active):
            raise SchedulerError(f"request id {req.req_id!r} is already active; use a unique req_id")
        if req.dim != self.model.dim or req.kv_cache.dim not in (None, self.model.dim):
            raise SchedulerError(
                f"request {req.req_id!r} has dim {req.dim} (cache dim {req.kv_cache.dim}) but the model has "
                f"dim {self.model.dim}"
            )
        if req.prefill_pos != 0 or req.generated_tokens or len(req.kv_cache) != 0:
            raise SchedulerError(f"request {req.req_id!r} has already run ({req!r}); add a new Request")
        if any(r.kv_cache is req.kv_cache for r in self.active):
            raise SchedulerError(f"request {req.req_id!r} shares its kv_cache with an active request; give it its own")
        if not (same_device(req.prompt.device, self.model.device) and same_device(req.kv_cache.device, self.model.device)):
            raise SchedulerError(
                f"request {req.req_id!r} (prompt on {req.prompt.device}, cache on {req.kv_cache.device}) "
                f"must be on the model's device {self.model.device}"
            )
        req.kv_cache.hooks = self.plugins.cache_plugins  # live: plugins registered later run too
        self.active.append(req)
        logger.debug("added %r", req)

    def step(self) -> dict[str, Any]:
        """Run one step (plan, compute, commit) and return its stats."""
        if not self.active:
            return self._stats(self.step_id, 0, 0, 0, 0.0, "no_active_requests")
        start = time.perf_counter()
        plan = self.schedule()
        check_blocks(plan)
        self.plugins.before_step(plan)
        result = self.executor.run(plan)
        finished = self.commit(plan, result)
        stats = self._stats(
            plan.step_id, plan.num_decode_tokens, plan.num_prefill_tokens, len(finished),
            time.perf_counter() - start, "completed",
        )
        self.plugins.after_step(stats)
        return stats

    def schedule(self) -> StepPlan:
        """Decide this step's decode tokens and prefill chunks. Changes nothing."""
        decode = self._select_decodes()
        budget = self.max_tokens_per_step - len(decode)
        prefill: list[PrefillChunk] = []
        for req in self.active:
            if budget == 0:
                break
            if req.in_prefill:
                n = min(self.prefill_chunk_size, budget, req.prompt_len - req.prefill_pos)
                prefill.append(PrefillChunk(req, req.prefill_pos, n))
                budget -= n
        return StepPlan(self.step_id, tuple(decode), tuple(prefill))

    def _select_decodes(self) -> list[Request]:
        decoders = [r for r in self.active if r.in_decode]
        if len(decoders) <= self.max_tokens_per_step:
            return decoders
        # Round robin: the least recently served go first (never served: arrival order).
        waited = sorted(decoders, key=lambda r: self._decode_turn.get(r.req_id, -1))
        return waited[: self.max_tokens_per_step]

    def commit(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Write a computed step into the requests; returns the requests it finished."""
        requests = [chunk.request for chunk in plan.prefill] + list(plan.decode)
        outputs = result.prefill + result.decode
        append_batch([(req.kv_cache, out.k, out.v) for req, out in zip(requests, outputs, strict=True)])
        for chunk in plan.prefill:
            chunk.request.prefill_pos = chunk.end
        for req, out in zip(requests, outputs):
            if out.token is not None:
                req.append_token(out.token)
        for req in plan.decode:
            self._decode_turn[req.req_id] = self._next_turn
            self._next_turn += 1
        finished = [r for r in self.active if r.finished]
        self.active = [r for r in self.active if not r.finished]
        self.step_id = plan.step_id + 1
        self.num_finished += len(finished)
        for req in finished:
            self._decode_turn.pop(req.req_id, None)
            if isinstance(req.kv_cache, PagedKVCache) and req.kv_cache.shares_pool:
                req.kv_cache.release()  # a shared pool's blocks go back at once; private caches stay readable
            logger.debug("step %d finished %r", plan.step_id, req)
            self.plugins.on_request_completion(req)
        return finished

    def _stats(
        self, step_id: int, decode: int, prefill: int, finished: int, duration: float, status: str
    ) -> dict[str, Any]:
        return {
            "step_id": step_id,
            "decode_tokens": decode,
            "prefill_tokens": prefill,
            "total_tokens": decode + prefill,
            "active_requests": len(self.active),
            "finished_requests": finished,
            "step_duration": duration,
            "status": status,
        }

    def run_until_complete(self, max_steps: int | None = None) -> list[dict[str, Any]]:
        """Step until no request is active; returns every step's stats."""
        history: list[dict[str, Any]] = []
        while self.active and (max_steps is None or len(history) < max_steps):
            history.append(self.step())
        return history

    def __repr__(self) -> str:
        return (
            f"Scheduler(step={self.step_id}, active={len(self.active)}, finished={self.num_finished}, "
            f"budget={self.max_tokens_per_step}, chunk={self.prefill_chunk_size})"
        )
