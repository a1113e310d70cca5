"""Seeded workloads: random requests and their arrival steps, and a loop that runs them.

``random_requests`` draws prompt and output lengths uniformly from inclusive ranges with
its own ``torch.Generator``, so the same seed gives the same workload on any machine.
``run_workload`` adds each request at its arrival step (a step is one ``Scheduler.step``
call; the clock keeps ticking while nothing is active) and steps until all are done.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from cb_lab.core.kv_cache import BaseKVCache, DenseKVCache, PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.exceptions import ConfigurationError

__all__ = ["random_requests", "run_workload"]


def _make_cache(cache: str, block_size: int, device: torch.device) -> BaseKVCache:
    if cache == "dense":
        return DenseKVCache(device)
    if cache == "paged":
        return PagedKVCache(block_size, device)
    raise ConfigurationError(f"cache must be 'dense' or 'paged', got {cache!r}")


def random_requests(
    num_requests: int,
    *,
    dim: int,
    prompt_lens: tuple[int, int] = (4, 64),
    output_lens: tuple[int, int] = (1, 64),
    cache: str = "dense",
    block_size: int = 16,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[Request]:
    """``num_requests`` requests ``r000, r001, ...`` with random prompts ``[L, dim]`` and budgets."""
    for name, (lo, hi) in (("prompt_lens", prompt_lens), ("output_lens", output_lens)):
        if not 0 <= lo <= hi or (name == "prompt_lens" and lo < 1):
            raise ConfigurationError(f"{name} must be an inclusive range (lo, hi) with lo <= hi, got {(lo, hi)}")
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    prompt_l = torch.randint(prompt_lens[0], prompt_lens[1] + 1, (num_requests,), generator=gen).tolist()
    output_l = torch.randint(output_lens[0], output_lens[1] + 1, (num_requests,), generator=gen).tolist()
    return [
        Request(f"r{i:03d}", torch.randn(L, dim, generator=gen).to(device), n, _make_cache(cache, block_size, device))
        for i, (L, n) in enumerate(zip(prompt_l, output_l))
    ]


def run_workload(scheduler: Scheduler, arrivals: Sequence[tuple[int, Request]]) -> list[dict[str, Any]]:
    """Add each ``(arrival_step, request)`` when its step comes; returns every step's stats."""
    pending = deque(sorted(arrivals, key=lambda pair: pair[0]))
    history: list[dict[str, Any]] = []
    now = 0
    while pending or scheduler.active:
        while pending and pending[0][0] <= now:
            scheduler.add_request(pending.popleft()[1])
        history.append(scheduler.step())
        now += 1
    return history
