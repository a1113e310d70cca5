"""What ``Scheduler.add_request`` checks a new request against, before it is queued.

A request that passes can run to its end: it is new (its ids and its cache unused by the active
requests), it fits the model (``executor.check_fits_model``), its longest prefill can run under the
settings, and its pool can hold it alone. A setting changed between steps is checked against the
active requests the same way (``unrunnable_prefill``).
"""

from __future__ import annotations

from cb_lab.core.kv_cache import shared_paged
from cb_lab.core.planner import SchedulerConfig
from cb_lab.core.queues import RequestQueues
from cb_lab.core.request import Request
from cb_lab.exceptions import SchedulerError

__all__ = ["check_can_finish", "check_fresh", "unrunnable_prefill"]


def check_fresh(queues: RequestQueues, req: Request) -> None:
    """A new request of its own: unused ids, no parent, nothing run, a cache nobody active holds."""
    if not queues.is_free(req):
        raise SchedulerError(f"request id {req.req_id!r} (or a sample of it) is already active; use a unique req_id")
    if req.parent_id is not None:
        raise SchedulerError(f"request {req.req_id!r} names parent {req.parent_id!r}; Scheduler.fork adds forks")
    if req.prefill_pos != 0 or req.generated_tokens or len(req.kv_cache) != 0:
        raise SchedulerError(f"request {req.req_id!r} has already run ({req!r}); add a new Request")
    if queues.cache_in_use(req):
        raise SchedulerError(f"request {req.req_id!r} shares its kv_cache with an active request; give it its own")


def _longest_prefill(req: Request) -> int:
    return req.prompt_len + max(req.max_new_tokens - 1, 0)  # after a preemption at its last token


def unrunnable_prefill(config: SchedulerConfig, req: Request) -> str | None:
    """Why ``req``'s longest prefill could never run under ``config`` (None: it can)."""
    rows = _longest_prefill(req)
    if config.enable_chunked_prefill or rows <= config.max_tokens_per_step:
        return None
    return (f"request {req.req_id!r} may need a {rows}-row prefill but chunked prefill is off and the budget is "
            f"{config.max_tokens_per_step}; raise max_tokens_per_step or enable chunked prefill")


def check_can_finish(config: SchedulerConfig, req: Request) -> None:
    """Its longest prefill can run, and a fixed shared pool can hold all its rows alone."""
    unrunnable = unrunnable_prefill(config, req)
    if unrunnable is not None:
        raise SchedulerError(unrunnable)
    cache = shared_paged(req.kv_cache)
    if cache is None or cache.pool is None or cache.pool.growable:
        return
    blocks = cache.blocks_needed(_longest_prefill(req))
    if blocks > cache.pool.num_blocks:
        raise SchedulerError(f"request {req.req_id!r} needs {blocks} KV blocks but its pool has "
                             f"{cache.pool.num_blocks} in all; give the BlockPool more num_blocks")
