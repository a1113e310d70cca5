"""The serving simulation: one workload, one engine, one model, several scheduling policies.

A *policy* here is plain data, a :class:`ServingConfig`: which order the planner spends the
token budget in, whether prefills are chunked, how many requests may run at once
(``max_num_seqs``, the batch capacity) and whether the K/V lives in one shared block pool
(``num_blocks``; too few blocks and requests get preempted). :data:`POLICY_PRESETS` names
the classic ones::

    static               a fixed batch of max_num_seqs; the next starts when the whole batch is done
    continuous           decode first, chunked prefill, refill a slot the step it frees (vLLM)
    continuous_no_chunk  the same, but every prefill runs in one piece
    prefill_first        new prompts before running decodes (better TTFT, worse TPOT)
    sjf                  continuous, but the waiting queue is served shortest job first

:func:`simulate` runs one policy on a workload (``RequestSpec`` s) and returns a
:class:`RunResult`: the finished requests, the per-step trace, and a summary whose keys
(``SUMMARY_KEYS``) are what ``python -m cb_lab simulate/compare --json`` prints.
:func:`compare` runs several policies on the *same* specs, model weights and prompts, so
every difference comes from the schedule. Latencies are counted in steps (deterministic:
the same on every machine) and in seconds (this machine, this run).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from cb_lab.checks import check_bool, check_choice, check_int
from cb_lab.core.block_pool import BlockPool
from cb_lab.core.executor import EXECUTORS
from cb_lab.core.planner import POLICIES
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.core.view_registry import render
from cb_lab.exceptions import ConfigurationError
from cb_lab.model.oracle import oracle_error
from cb_lab.model.tiny_llm import TinyLLM
from cb_lab.monitoring.metrics import MetricsCollector
from cb_lab.monitoring.trace import StepTrace, TracePlugin
from cb_lab.plugins.base import PluginManager, SchedulerPlugin
from cb_lab.plugins.builtin import MetricsPlugin
from cb_lab.workload import LengthDist, WorkloadConfig, build_requests, run_workload
from cb_lab.workload_io import RequestSpec, check_specs

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_COMPARE", "HEADLINE_WORKLOAD", "POLICY_PRESETS", "QUICK_WORKLOAD", "RATIO_KEYS", "SUMMARY_KEYS",
    "Progress", "RunResult", "ServingConfig",
    "batch_stats", "check_fits", "compare", "make_config", "ratios", "simulate", "warm_up",
]

Progress = Callable[[int, int], None]  # (steps done, requests finished so far)

# What a run reports (``RunResult.summary``), in this order. ``policy`` is the preset name;
# the rest come from MetricsPlugin's run summary, plus ``requests`` and ``wall_s``.
SUMMARY_KEYS = (
    "policy", "requests", "steps", "wall_s", "gen_tokens", "tokens_per_s", "tokens_per_step",
    "ttft_p50_steps", "ttft_p99_steps", "tpot_p50_steps", "e2e_p99_steps", "queueing_p50_steps",
    "preemptions", "padding_tokens", "kv_utilization", "requests_per_s", "ttft_p99_s",
    "prefix_hit_rate", "prefix_block_hit_rate", "prefill_tokens_saved", "kv_evictions", "kv_copies",
)
# The numbers ``compare`` divides by the baseline's (static batching's).
RATIO_KEYS = (
    "steps", "wall_s", "tokens_per_s", "tokens_per_step", "ttft_p50_steps", "ttft_p99_steps",
    "tpot_p50_steps", "e2e_p99_steps",
)


@dataclass(frozen=True, slots=True)
class ServingConfig:
    """One engine configuration. The defaults are the headline experiment's (docs/serving.md)."""

    policy: str = "decode_first"  # the planner's order: decode_first, prefill_first, sjf or static
    max_tokens_per_step: int = 512  # the token budget of a step
    prefill_chunk_size: int = 32  # a prefill chunk's rows at most (when chunked)
    max_num_seqs: int | None = 16  # the batch capacity: running requests at most (None: no cap)
    enable_chunked_prefill: bool = True  # False: a prompt is prefilled in one piece or waits
    num_blocks: int | None = None  # one shared KV BlockPool of this many blocks; None: dense caches
    block_size: int = 16  # rows per KV block (with num_blocks)
    executor: str = "fused"  # one forward per step ("fused") or one per decode token ("split")
    preempt_every: int | None = None  # force a preemption every N steps (a rare event, made common)
    enable_prefix_caching: bool = False  # admissions reuse cached full blocks of a shared prefix (num_blocks)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigurationError(f"ServingConfig policy must be one of {POLICIES}, got {self.policy!r}")
        check_choice("ServingConfig executor", self.executor, EXECUTORS)
        for flag in ("enable_chunked_prefill", "enable_prefix_caching"):
            check_bool(flag, getattr(self, flag))
        for name in ("max_tokens_per_step", "prefill_chunk_size", "block_size"):
            check_int(f"ServingConfig {name}", getattr(self, name))
        for name in ("max_num_seqs", "num_blocks", "preempt_every"):
            if getattr(self, name) is not None:
                check_int(f"ServingConfig {name}", getattr(self, name))
        if self.enable_prefix_caching and self.num_blocks is None:  # dense caches share nothing: it would do nothing
            raise ConfigurationError("enable_prefix_caching needs a shared block pool; give num_blocks too")


POLICY_PRESETS: dict[str, ServingConfig] = {
    "static": ServingConfig(policy="static"),
    "continuous": ServingConfig(policy="decode_first"),
    "continuous_no_chunk": ServingConfig(policy="decode_first", enable_chunked_prefill=False),
    "prefill_first": ServingConfig(policy="prefill_first"),
    "sjf": ServingConfig(policy="sjf"),
}
DEFAULT_COMPARE = tuple(POLICY_PRESETS)
# The headline experiment (docs/benchmarks.md): prompts of 8..64 rows and chat-like answers, most
# a handful of tokens (median 4) but one in 20 over 100 (lognormal, sigma 2, at most 256).
HEADLINE_WORKLOAD = WorkloadConfig(1024, LengthDist.uniform(8, 64), LengthDist.lognormal(4, 2.0, maximum=256))
QUICK_WORKLOAD = replace(HEADLINE_WORKLOAD, num_requests=128, output_lens=LengthDist.lognormal(4, 2.0, maximum=64))
# What a preset fixes (the policy); everything else is an engine knob every policy shares.
_ENGINE_KNOBS = (
    "max_tokens_per_step", "prefill_chunk_size", "max_num_seqs", "num_blocks", "block_size", "executor",
    "preempt_every", "enable_prefix_caching",
)


def make_config(name: str, **engine: Any) -> ServingConfig:
    """The preset ``name`` with engine knobs replaced, e.g. ``make_config("static", max_num_seqs=8)``."""
    if name not in POLICY_PRESETS:
        raise ConfigurationError(f"unknown policy {name!r}; the presets are {list(POLICY_PRESETS)}")
    if unknown := sorted(set(engine) - set(_ENGINE_KNOBS)):
        raise ConfigurationError(f"{unknown} are not engine knobs; use {list(_ENGINE_KNOBS)}")
    return replace(POLICY_PRESETS[name], **engine)


def check_fits(specs: Sequence[RequestSpec], config: ServingConfig) -> None:
    """Raise ConfigurationError, before anything runs, if some request could never finish.

    The scheduler checks the same at ``add_request``, but a request arriving late would
    only fail half-way through a run. A request may need to prefill ``prompt + max_new - 1``
    rows at once (after a preemption), so that is what must fit the budget (unchunked) and
    the pool.
    """
    worst = max(check_specs(specs), key=lambda s: s.prompt_len + s.max_new_tokens, default=None)
    if worst is None:
        raise ConfigurationError("the workload has no requests")
    rows = worst.prompt_len + max(worst.max_new_tokens - 1, 0)
    if not config.enable_chunked_prefill and rows > config.max_tokens_per_step:
        raise ConfigurationError(
            f"request {worst.req_id!r} may need a {rows}-row prefill but chunked prefill is off and "
            f"max_tokens_per_step is {config.max_tokens_per_step}; raise the budget to >= {rows} or shorten the "
            "workload"
        )
    if config.num_blocks is not None and -(-rows // config.block_size) > config.num_blocks:
        raise ConfigurationError(
            f"request {worst.req_id!r} needs {-(-rows // config.block_size)} KV blocks of {config.block_size} rows "
            f"but num_blocks is {config.num_blocks}; give the pool more blocks"
        )


class _Progress(SchedulerPlugin):
    """Reports (steps done, requests finished) to ``callback`` after every step."""

    def __init__(self, callback: Progress) -> None:
        self.callback = callback
        self.steps = self.finished = 0

    def after_step(self, stats: dict[str, Any]) -> None:
        self.steps += 1
        self.finished += stats["finished_requests"]
        self.callback(self.steps, self.finished)


@dataclass(slots=True)
class RunResult:
    """One policy's run: its requests (tokens generated), trace, summary, and the model to check them."""

    name: str  # the preset's name (or the policy's, for a hand-made config)
    config: ServingConfig
    model: TinyLLM
    requests: list[Request]  # in workload order, all finished
    steps: list[StepTrace]  # TracePlugin's record, one per step that ran
    summary: dict[str, Any]  # SUMMARY_KEYS
    wall_s: float  # the whole run_workload call, plugins included
    pool: BlockPool | None = None  # the shared pool (num_blocks), empty again at the end
    _oracle: float | None = field(default=None, init=False, repr=False)

    def oracle_error(self) -> float:
        """Max |generated - naive dense recompute| over every request (computed once, then kept)."""
        if self._oracle is None:
            self._oracle = oracle_error(self.model, self.requests)
        return self._oracle

    def __repr__(self) -> str:  # the dataclass's would print every request and step
        return (f"RunResult({self.name!r}, requests={len(self.requests)}, steps={len(self.steps)}, "
                f"wall_s={self.wall_s:.3f})")

    def _repr_html_(self) -> str:
        return render(self)


def batch_stats(result: RunResult) -> dict[str, float]:
    """Why static batching loses, from the workload alone: the mean vs the longest output per batch.

    A batch is the requests one step admitted (static batching admits a whole batch in one step
    and no more until it is done). A static batch decodes for as many steps as its longest
    answer, so its slots do useful work ``mean_output / mean_longest`` of the time, and
    ``bound = mean_longest / mean_output`` is the tokens-per-step ratio that continuous
    batching, refilling each slot the step it frees, reaches at best with the same slots.
    """
    out = {r.req_id: r.max_new_tokens for r in result.requests}
    batches = [[out[req_id] for req_id in s.admitted] for s in result.steps if s.admitted]
    mean_output = sum(out.values()) / len(out)
    mean_longest = sum(map(max, batches)) / len(batches)
    return {
        "batches": len(batches),
        "batch_size": len(out) / len(batches),
        "mean_output": mean_output,
        "mean_longest": mean_longest,
        "bound": mean_longest / mean_output if mean_output else math.nan,
    }


def simulate(
    specs: Sequence[RequestSpec],
    config: ServingConfig | str = "continuous",
    *,
    name: str | None = None,
    dim: int = 16,
    seed: int = 0,
    progress: Progress | None = None,
    plugins: Sequence[SchedulerPlugin] = (),
) -> RunResult:
    """Run ``specs`` under one policy (a ServingConfig or a preset name) to completion.

    The model's weights and the prompts depend only on ``(dim, seed)``, so runs of the same
    specs under different policies see the same numbers. Dense caches are emptied after the
    run (the generated tokens stay, which is all the oracle needs); a shared pool gives its
    blocks back as requests finish. ``plugins``: more scheduler plugins, called after the
    run's own trace and metrics (a live page's, a trace file's).
    """
    if isinstance(config, str):
        name, config = name or config, make_config(config)
    if not isinstance(config, ServingConfig):
        raise ConfigurationError(f"config must be a ServingConfig or a preset name, got {type(config).__name__}")
    check_fits(specs, config)
    if config.policy == "static" and (config.max_num_seqs is None or config.enable_chunked_prefill and
                                      config.max_num_seqs * config.prefill_chunk_size > config.max_tokens_per_step):
        logger.warning("static batching admits a batch in one step: a budget of %d tokens may hold fewer than "
                       "max_num_seqs=%s prompt chunks of %d", config.max_tokens_per_step, config.max_num_seqs,
                       config.prefill_chunk_size)
    with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's RNG untouched
        torch.manual_seed(seed)
        model = TinyLLM(dim)
    pool = BlockPool(config.num_blocks, config.block_size, dim) if config.num_blocks is not None else None
    arrivals = build_requests(specs, dim=dim, cache="dense" if pool is None else "shared",
                              block_size=config.block_size, seed=seed, pool=pool)
    trace = TracePlugin(budget=config.max_tokens_per_step)
    metrics = MetricsPlugin(MetricsCollector(enable_memory_profiling=False))  # RSS per step is not free
    manager = PluginManager()
    manager.register_scheduler_plugin(trace)
    manager.register_scheduler_plugin(metrics)
    if progress is not None:
        manager.register_scheduler_plugin(_Progress(progress))
    for plugin in plugins:
        manager.register_scheduler_plugin(plugin)
    scheduler = Scheduler(
        model, config.max_tokens_per_step, config.prefill_chunk_size, plugins=manager, executor=config.executor,
        max_num_seqs=config.max_num_seqs, policy=config.policy, enable_chunked_prefill=config.enable_chunked_prefill,
        preempt_every=config.preempt_every, enable_prefix_caching=config.enable_prefix_caching,
    )
    start = time.perf_counter()
    run_workload(scheduler, arrivals)
    wall_s = time.perf_counter() - start
    requests = [req for _, req in arrivals]
    for req in requests:
        if req.kv_cache.shared_pool is None:  # a shared pool's blocks went back when the request finished
            req.kv_cache.release()
    name = name or config.policy
    run = metrics.get_summary()["run"]
    run |= {"policy": name, "requests": len(requests), "wall_s": wall_s}
    summary = {key: run[key] for key in SUMMARY_KEYS}
    logger.info("%s: %d requests in %d steps, %.2f s", name, len(requests), summary["steps"], wall_s)
    return RunResult(name, config, model, requests, trace.steps, summary, wall_s, pool)


def compare(
    specs: Sequence[RequestSpec],
    names: Sequence[str] = DEFAULT_COMPARE,
    *,
    dim: int = 16,
    seed: int = 0,
    **engine: Any,
) -> list[RunResult]:
    """Each preset in ``names`` on the same specs, weights and prompts, with the same engine knobs."""
    configs = [make_config(n, **engine) for n in names]  # every name checked before anything runs
    warm_up(specs, configs[0], dim=dim, seed=seed)
    return [simulate(specs, c, name=n, dim=dim, seed=seed) for n, c in zip(names, configs)]


def warm_up(specs: Sequence[RequestSpec], config: ServingConfig, *, dim: int = 16, seed: int = 0) -> None:
    """An untimed run of a few requests, so that the first policy timed does not pay torch's
    one-time costs (first calls of each op, first allocations) that the others are spared."""
    simulate(list(specs)[:8], config, dim=dim, seed=seed)


def ratios(summary: dict[str, Any], baseline: dict[str, Any], keys: Sequence[str] = RATIO_KEYS) -> dict[str, Any]:
    """``summary[key] / baseline[key]`` for each key (None where either is missing or the baseline is 0)."""
    out: dict[str, float | None] = {}
    for key in keys:
        a, b = summary.get(key), baseline.get(key)
        out[key] = a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b != 0 else None
    return out
