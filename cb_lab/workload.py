"""Seeded workloads: who arrives when, with how long a prompt, asking for how many tokens.

A serving experiment is only as honest as its workload. The knobs, and what each models:

- ``arrival="all_at_once"``: every request at step 0, a *batch job* (an offline evaluation,
  a night of summaries). The scheduler only drains a queue.
- ``arrival="poisson"``: *independent users*. Gaps between arrivals are exponential with
  mean ``1 / rate`` steps, so bursts and lulls come for free, as they do in production.
- Lengths (:class:`LengthDist`): ``fixed`` and ``uniform`` for controlled experiments;
  ``lognormal`` and ``pareto`` for *chat*, where most answers are short and a few are very
  long. That long tail is exactly what hurts static batching: a static batch runs as long
  as its longest answer while the finished ones hold their slots idle. Continuous batching
  refills a slot the step it frees.
- Shared prefixes (``num_prefixes``, ``prefix_len``): requests that start with the same
  rows, like many chats behind one system prompt. Prefix caching will reuse them.

The pieces, in the order they run::

    WorkloadConfig --generate_workload--> [RequestSpec]               plain data; save_workload / load_workload
                   --build_requests-----> [(arrival_step, Request)]   prompts [L, dim] and their KV caches
                   --run_workload-------> every step's stats

``run_workload`` adds each request at its arrival step (a step is one ``Scheduler.step``; the
clock ticks on while nothing is active) and steps until all are done. Every draw comes from its
own ``torch.Generator``, so the same seed gives the same workload on any machine.
:func:`random_requests` is the older shortcut: uniform lengths, prompts drawn in one stream.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cb_lab.checks import check_int
from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import BaseKVCache, DenseKVCache, PagedKVCache, same_device
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.exceptions import ConfigurationError
from cb_lab.workload_io import RequestSpec, check_specs, load_workload, save_workload

logger = logging.getLogger(__name__)

__all__ = [  # RequestSpec, save_workload and load_workload live in cb_lab.workload_io (specs and their files)
    "LengthDist", "RequestSpec", "WorkloadConfig", "build_requests", "generate_workload", "load_workload",
    "random_requests", "run_workload", "save_workload",
]

ARRIVALS = ("all_at_once", "poisson")
# What a and b must be, per kind (checked in LengthDist.__post_init__).
_DIST_RULES: dict[str, tuple[Callable[[float, float], bool], str]] = {
    "fixed": (lambda a, b: a >= 0, "a (the length) must be >= 0"),
    "uniform": (lambda a, b: 0 <= a <= b and a == int(a) and b == int(b),
                "a <= b (low, high, both inclusive) must be whole numbers >= 0"),
    "lognormal": (lambda a, b: a > 0 and b > 0, "a (median) and b (sigma) must be > 0; for no spread use fixed"),
    "pareto": (lambda a, b: a > 0 and b > 0, "a (scale, the smallest length) and b (alpha) must be > 0"),
}


@dataclass(frozen=True, slots=True)
class LengthDist:
    """A length distribution; :meth:`sample` gives ints, rounded and clipped to ``[minimum, maximum]``.

    ``"fixed"``: always ``a``. ``"uniform"``: ``a..b``, both ends included. ``"lognormal"``: median
    ``a``, sigma ``b`` of the log (the mean is ``a * exp(b**2 / 2)``, above the median: a right tail).
    ``"pareto"``: nothing below the scale ``a``; tail index ``b`` (alpha): the smaller, the heavier
    the tail (the median is ``a * 2**(1/b)``; for alpha <= 1 the mean is infinite).
    Build one with the helpers, e.g. ``LengthDist.lognormal(64, 1.0, maximum=1024)``.
    """

    kind: str
    a: float
    b: float = 0.0
    minimum: int = 1
    maximum: int = 4096

    def __post_init__(self) -> None:
        if self.kind not in _DIST_RULES:
            raise ConfigurationError(f"LengthDist kind must be one of {tuple(_DIST_RULES)}, got {self.kind!r}")
        for x in (self.a, self.b):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise ConfigurationError(f"LengthDist {self.kind}: a and b must be finite numbers, got {x!r}")
        rule, what = _DIST_RULES[self.kind]
        if not rule(self.a, self.b):
            raise ConfigurationError(f"LengthDist {self.kind}: {what}, got a={self.a!r}, b={self.b!r}")
        check_int("LengthDist minimum", self.minimum, 0)
        if check_int("LengthDist maximum", self.maximum, 0) < self.minimum:
            raise ConfigurationError(f"LengthDist maximum {self.maximum} is below minimum {self.minimum}; swap them")

    @classmethod
    def fixed(cls, n: int) -> LengthDist:
        return cls("fixed", n, minimum=n, maximum=n)

    @classmethod
    def uniform(cls, low: int, high: int) -> LengthDist:
        return cls("uniform", low, high, minimum=low, maximum=high)

    @classmethod
    def lognormal(cls, median: float, sigma: float, *, minimum: int = 1, maximum: int = 4096) -> LengthDist:
        return cls("lognormal", median, sigma, minimum, maximum)

    @classmethod
    def pareto(cls, scale: float, alpha: float, *, minimum: int = 1, maximum: int = 4096) -> LengthDist:
        return cls("pareto", scale, alpha, minimum, maximum)

    def sample(self, n: int, gen: torch.Generator) -> list[int]:
        """``n`` lengths drawn from ``gen`` with one tensor op (``fixed`` draws nothing)."""
        check_int("n", n, 0)
        if self.kind == "fixed":
            x = torch.full((n,), float(self.a))
        elif self.kind == "uniform":  # the same draws as torch.randint(low, high + 1)
            x = torch.randint(int(self.a), int(self.b) + 1, (n,), generator=gen)
        elif self.kind == "lognormal":
            x = torch.empty(n).log_normal_(math.log(self.a), self.b, generator=gen)
        else:  # pareto by inversion: scale * U**(-1/alpha) == scale * exp(E) with E ~ Exponential(rate=alpha)
            x = self.a * torch.empty(n).exponential_(self.b, generator=gen).exp()  # may overflow to inf: clipped
        return x.round().clamp(self.minimum, self.maximum).long().tolist()


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    """What :func:`generate_workload` draws (every knob is explained in the module docstring)."""

    num_requests: int
    prompt_lens: LengthDist
    output_lens: LengthDist
    arrival: str = "all_at_once"  # a batch job; "poisson": independent users
    rate: float = 1.0  # poisson only: mean arrivals per step
    num_prefixes: int = 0  # > 0: each request starts with one of this many shared prefixes, picked at random
    prefix_len: int = 0  # rows in each shared prefix; every prompt must be at least this long
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("num_requests", self.num_requests, 1)
        for name in ("prompt_lens", "output_lens"):
            if not isinstance(getattr(self, name), LengthDist):
                raise ConfigurationError(f"{name} must be a LengthDist, e.g. LengthDist.uniform(4, 64)")
        if self.arrival not in ARRIVALS:
            raise ConfigurationError(f"arrival must be one of {ARRIVALS}, got {self.arrival!r}")
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) or not 0 < self.rate < math.inf:
            raise ConfigurationError(f"rate (mean arrivals per step) must be a number > 0, got {self.rate!r}")
        has_prefixes = check_int("num_prefixes", self.num_prefixes, 0) > 0
        if has_prefixes != (check_int("prefix_len", self.prefix_len, 0) > 0):
            raise ConfigurationError(f"num_prefixes={self.num_prefixes} with prefix_len={self.prefix_len}: "
                                     "shared prefixes need both >= 1 (or both 0 for none)")
        if max(self.prefix_len, 1) > self.prompt_lens.minimum:
            raise ConfigurationError(
                f"prompt_lens.minimum is {self.prompt_lens.minimum} but every prompt needs at least "
                f"max(1, prefix_len={self.prefix_len}) rows; raise the LengthDist's minimum")
        check_int("seed", self.seed, 0)


def generate_workload(config: WorkloadConfig) -> list[RequestSpec]:
    """``config.num_requests`` specs ``r000, r001, ...`` in arrival order, all drawn from ``config.seed``."""
    if not isinstance(config, WorkloadConfig):
        raise ConfigurationError(f"config must be a WorkloadConfig, got {type(config).__name__}")
    n, gen = config.num_requests, torch.Generator().manual_seed(config.seed)
    prompt_lens, output_lens = config.prompt_lens.sample(n, gen), config.output_lens.sample(n, gen)
    arrivals = [0] * n
    if config.arrival == "poisson":  # a request arrives in the step its (continuous) arrival time falls in
        times = torch.empty(n, dtype=torch.float64).exponential_(config.rate, generator=gen).cumsum(0)
        arrivals = times.floor().long().tolist()
    prefix_ids: list[int | None] = [None] * n
    if config.num_prefixes:
        prefix_ids = torch.randint(config.num_prefixes, (n,), generator=gen).tolist()
    logger.debug("workload: %d requests, %d prompt and %d output tokens, last arrival at step %d",
                 n, sum(prompt_lens), sum(output_lens), arrivals[-1])
    return [
        RequestSpec(f"r{i:03d}", t, L, m, pid, 0 if pid is None else config.prefix_len)
        for i, (t, L, m, pid) in enumerate(zip(arrivals, prompt_lens, output_lens, prefix_ids))
    ]


# --- tensors: prompts and KV caches --------------------------------------------------------------


def _generator(seed: int, stream: str, index: int) -> torch.Generator:
    """A generator for one stream of one seed: ("prompt", 3) and ("prefix", 3) never share numbers."""
    digest = hashlib.blake2b(f"{seed}/{stream}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def _shared_pool(lengths: Iterable[tuple[int, int]], block_size: int, dim: int, device: torch.device) -> BlockPool:
    """One pool big enough for every ``(prompt_len, max_new_tokens)`` request at once."""
    blocks = sum(-(-(L + n) // block_size) for L, n in lengths)
    return BlockPool(max(blocks, 1), block_size, dim, device=device)


def _cache_factory(
    cache: str, block_size: int, device: torch.device, pool: BlockPool | None
) -> Callable[[], BaseKVCache]:
    """Checks ``cache`` once; the factory makes one new cache per request."""
    if cache == "dense":
        return lambda: DenseKVCache(device)
    if cache == "paged":
        return lambda: PagedKVCache(block_size, device)
    if cache == "shared":
        return lambda: PagedKVCache(block_size, device, pool=pool)
    raise ConfigurationError(f"cache must be 'dense', 'paged' or 'shared', got {cache!r}")


def build_requests(
    specs: Sequence[RequestSpec],
    *,
    dim: int,
    cache: str = "dense",
    block_size: int = 16,
    seed: int = 0,
    device: torch.device | str = "cpu",
    pool: BlockPool | None = None,
) -> list[tuple[int, Request]]:
    """``(arrival_step, Request)`` pairs for :func:`run_workload`, prompts ``[prompt_len, dim]``.

    Request ``i``'s rows are seeded by ``(seed, i)`` alone, so they do not change when other
    specs do; requests with the same ``prefix_id`` get identical first ``prefix_len`` rows (seeded
    by ``(seed, prefix_id)``). ``cache``: ``"dense"``, ``"paged"`` (a private pool each) or
    ``"shared"``: every cache on ``pool`` (whose dim, block size and device must match), or on one
    new ``BlockPool`` big enough for every request at once.
    """
    specs = check_specs(specs)
    for name, value, low in (("dim", dim, 1), ("block_size", block_size, 1), ("seed", seed, 0)):
        check_int(name, value, low)
    device = torch.device(device)
    if pool is not None and (cache != "shared" or (pool.dim, pool.block_size) != (dim, block_size)
                             or not same_device(pool.device, device)):
        raise ConfigurationError(
            f"the pool holds dim {pool.dim}, block_size {pool.block_size} on {pool.device}; pass cache='shared' "
            f"and those values (got cache={cache!r}, dim={dim}, block_size={block_size}, device={device})")
    if cache == "shared" and pool is None:
        pool = _shared_pool(((s.prompt_len, s.max_new_tokens) for s in specs), block_size, dim, device)
    new_cache = _cache_factory(cache, block_size, device, pool)
    prefixes: dict[int, torch.Tensor] = {}  # prefix_id -> [prefix_len, dim]
    pairs = []
    for i, s in enumerate(specs):
        rows = torch.randn(s.prompt_len - s.prefix_len, dim, generator=_generator(seed, "prompt", i))
        if (pid := s.prefix_id) is not None:
            if pid not in prefixes:
                prefixes[pid] = torch.randn(s.prefix_len, dim, generator=_generator(seed, "prefix", pid))
            rows = torch.cat([prefixes[pid], rows])
        pairs.append((s.arrival_step, Request(s.req_id, rows.to(device), s.max_new_tokens, new_cache())))
    return pairs


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
    """``num_requests`` requests ``r000, r001, ...`` with random prompts ``[L, dim]`` and budgets.

    Lengths are uniform over the inclusive ranges; prompts come from the same generator, one
    after another. ``cache`` as in :func:`build_requests` (``"shared"``: ``requests[0].kv_cache.pool``).
    """
    for name, (lo, hi) in (("prompt_lens", prompt_lens), ("output_lens", output_lens)):
        if not 0 <= lo <= hi or (name == "prompt_lens" and lo < 1):
            raise ConfigurationError(f"{name} must be an inclusive range (lo, hi) with lo <= hi, got {(lo, hi)}")
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    prompt_l = LengthDist.uniform(*prompt_lens).sample(num_requests, gen)
    output_l = LengthDist.uniform(*output_lens).sample(num_requests, gen)
    pool = _shared_pool(zip(prompt_l, output_l), block_size, dim, device) if cache == "shared" else None
    new_cache = _cache_factory(cache, block_size, device, pool)
    return [
        Request(f"r{i:03d}", torch.randn(L, dim, generator=gen).to(device), n, new_cache())
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
