"""What must hold between two steps, checked: the scheduler's debug mode.

``Scheduler(..., check_invariants=True)`` (or ``CB_LAB_CHECK_INVARIANTS=1`` in the environment;
the test suite sets it) calls :func:`check_invariants` after every committed step:

- **the step**: it spent at most ``max_tokens_per_step`` tokens;
- **the queues**: no request is both waiting and running, a waiting request holds no K/V, and a
  step that admitted requests leaves at most ``max_num_seqs`` running;
- **positions**: each cache holds exactly the rows its request has run, contiguous from 0:
  ``prefill_pos`` prefill rows plus one per token fed back by a decode, and a paged cache has
  exactly the blocks those rows need;
- **block pools** (of the requests' paged caches): each block a request holds has a reference
  count equal to the number of block tables holding it; the free list is exactly the blocks of
  count 0 (so no block is both free and in use, none free twice); and, for a pool that serves
  this scheduler alone, its token count equals the rows its caches hold;
- **the numbers**, for small models (``dim <= 64`` and a sequence of at most 256 rows) and no
  cache plugin that rewrites rows (compression changes the numbers on purpose): every token the
  step produced equals a cache-free dense recompute of its request's whole prefix (through the
  sampler, which is called once more per token).

The first broken invariant raises ``SchedulerError`` naming the step and the request. It costs
a dense forward per new token, so it is a debug mode, off by default.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.plan import StepPlan
from cb_lab.core.request import Request
from cb_lab.exceptions import SchedulerError
from cb_lab.plugins.base import CachePlugin

if TYPE_CHECKING:
    from cb_lab.core.scheduler import Scheduler

__all__ = ["ORACLE_MAX_DIM", "ORACLE_MAX_ROWS", "DenseModel", "check_invariants", "expected_cache_len"]

ORACLE_MAX_DIM = 64  # the recompute check runs for models at most this wide ...
ORACLE_MAX_ROWS = 256  # ... and requests whose whole sequence is at most this long


@runtime_checkable
class DenseModel(Protocol):
    """A model with a cache-free dense forward (``TinyLLM``): the recompute the tokens must match."""

    dim: int

    def forward_prefill_dense(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def check_invariants(scheduler: Scheduler, plan: StepPlan, finished: Sequence[Request]) -> None:
    """Raise SchedulerError at the first invariant the step just committed breaks."""
    where = f"after step {plan.step_id}"
    budget = scheduler.max_tokens_per_step
    if plan.total_tokens > budget:
        raise SchedulerError(f"{where}: {plan.total_tokens} tokens ran, over the budget {budget}")
    _check_queues(scheduler, where)
    limit = scheduler.max_num_seqs  # (a limit lowered mid-run lets the requests running finish)
    if plan.admitted and limit is not None and len(scheduler.running) > limit:
        raise SchedulerError(f"{where}: admitted {len(plan.admitted)}, {len(scheduler.running)} requests run, over "
                             f"max_num_seqs={limit}")
    requests = [*scheduler.active, *finished]
    for req in requests:
        _check_positions(req, where)
    _check_pools(requests, where)
    sampler = scheduler.executor.sampler
    rewrites_rows = any(type(p).before_append is not CachePlugin.before_append for p in scheduler.plugins.cache_plugins)
    if isinstance(scheduler.model, DenseModel) and scheduler.model.dim <= ORACLE_MAX_DIM and not rewrites_rows:
        for req in [*(c.request for c in plan.prefill if c.completes_prompt), *plan.decode]:
            _check_last_token(scheduler.model, req, sampler, where)


def _check_queues(scheduler: Scheduler, where: str) -> None:
    both = {id(r) for r in scheduler.running} & {id(r) for r in scheduler.waiting}
    if both:
        names = [r.req_id for r in scheduler.running if id(r) in both]
        raise SchedulerError(f"{where}: request(s) {names} are both running and waiting")
    for req in scheduler.waiting:
        if len(req.kv_cache) or req.prefill_pos:
            raise SchedulerError(f"{where}: waiting request {req.req_id!r} holds K/V ({req!r})")


def expected_cache_len(req: Request) -> int:
    """Rows a request's cache holds: prefill rows run, plus one per token a decode fed back.

    After a preemption the prefill re-ran ``r = prefill_len - prompt_len`` generated tokens, so
    only the tokens after those were fed back by decodes (the last token never is).
    """
    recomputed = req.prefill_len - req.prompt_len
    return req.prefill_pos + max(len(req.generated_tokens) - recomputed - 1, 0)


def _check_positions(req: Request, where: str) -> None:
    cache = req.kv_cache
    shared_and_done = req.finished and cache.shared_pool is not None
    want = 0 if shared_and_done else expected_cache_len(req)  # a finished request's shared blocks went back
    if len(cache) != want:
        raise SchedulerError(f"{where}: request {req.req_id!r} caches {len(cache)} rows, expected {want} ({req!r})")
    if isinstance(cache, PagedKVCache) and len(cache.block_table) != -(-len(cache) // cache.block_size):
        raise SchedulerError(
            f"{where}: request {req.req_id!r} holds {len(cache.block_table)} blocks for {len(cache)} rows "
            f"of block size {cache.block_size}"
        )


def _check_pools(requests: Sequence[Request], where: str) -> None:
    users: dict[int, tuple[BlockPool, list[tuple[Request, PagedKVCache]]]] = {}
    for req in requests:
        cache = req.kv_cache
        if isinstance(cache, PagedKVCache) and cache.pool is not None:
            users.setdefault(id(cache.pool), (cache.pool, []))[1].append((req, cache))
    for pool, holders in users.values():
        caches = [cache for _, cache in holders]
        held = Counter(b for cache in caches for b in cache.block_table)
        for block_id, tables in held.items():
            if pool.ref_counts[block_id] != tables:
                raise SchedulerError(f"{where}: block {block_id} has ref count {pool.ref_counts[block_id]} but "
                                     f"{tables} block table(s) hold it")
        free, evictable = pool.free_block_ids, list(pool.evictable)
        unreferenced = [b for b, count in enumerate(pool.ref_counts) if count == 0]
        if len(set(free)) != len(free) or sorted(free + evictable) != unreferenced:
            raise SchedulerError(f"{where}: the free list {sorted(free)} and the evictable blocks {sorted(evictable)} "
                                 f"are not the blocks of ref count 0 {unreferenced}: a block is free and in use, "
                                 "free twice, or in use and evictable")
        if any(b not in pool.block_hashes for b in evictable):
            raise SchedulerError(f"{where}: an evictable block has no hash: {sorted(evictable)}")
        for req, cache in holders:
            _check_hashes(pool, req, cache, where)
        # A pool whose blocks in use are all held here serves this scheduler alone: its rows add up.
        if sum(pool.ref_counts) == sum(held.values()) and pool.num_tokens != sum(len(c) for c in caches):
            raise SchedulerError(f"{where}: the pool counts {pool.num_tokens} tokens, its caches hold "
                                 f"{sum(len(c) for c in caches)}")


def _check_hashes(pool: BlockPool, req: Request, cache: PagedKVCache, where: str) -> None:
    """Each cached block a request holds is registered under the hash of that request's rows there."""
    hashes = req.block_hashes(cache.block_size)
    for j, block_id in enumerate(cache.block_table):
        registered = pool.block_hashes.get(block_id)
        if registered is not None and (j >= len(hashes) or hashes[j] != registered):
            raise SchedulerError(f"{where}: block {block_id} of request {req.req_id!r} is cached under a hash "
                                 f"that is not its rows' (block {j} of its prefill)")


def _check_last_token(
    model: DenseModel, req: Request, sampler: Callable[[torch.Tensor], torch.Tensor] | None, where: str
) -> None:
    if req.prompt_len + len(req.generated_tokens) > ORACLE_MAX_ROWS:
        return
    # model/oracle.py's naive_tokens, last row only: one dense forward over prompt + every token fed back.
    seq = torch.cat([req.prompt, *(t[None] for t in req.generated_tokens[:-1])])  # [L + n - 1, D]
    row = model.forward_prefill_dense(seq)[0][-1]
    want = row if sampler is None else sampler(row)
    got = req.generated_tokens[-1]
    if not torch.allclose(got, want.to(got.dtype), rtol=1e-4, atol=1e-4):
        raise SchedulerError(
            f"{where}: request {req.req_id!r} token {len(req.generated_tokens)} differs from a dense recompute of "
            f"its prefix by {float((got - want).abs().max()):.2e}"
        )
