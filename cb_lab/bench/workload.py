"""``python -m cb_lab.bench workload``: a whole seeded workload to completion, timed.

256 requests (prompts 4..64 rows, outputs 1..64 tokens) arrive at step 0 and run under a
token budget, for each model dim, cache layout and executor asked for: steps, wall time,
tokens/s, RSS growth, and the paged/dense and fused/split ratios of the same run.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from cb_lab.core.executor import EXECUTORS
from cb_lab.core.scheduler import Scheduler
from cb_lab.model.tiny_llm import TinyLLM
from cb_lab.monitoring.memory_profiler import DetailedMemoryProfiler, process_peak_rss_mb
from cb_lab.workload import random_requests, run_workload

__all__ = ["add_parser"]


@dataclass(frozen=True, slots=True)
class BenchResult:
    dim: int
    cache: str
    executor: str
    steps: int
    wall_s: float
    generated_tokens: int
    total_tokens: int
    rss_delta_mb: float
    peak_rss_mb: float

    @property
    def generated_per_s(self) -> float:
        return self.generated_tokens / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return self.total_tokens / self.wall_s


def run_one(args: argparse.Namespace, dim: int, cache: str, executor: str) -> BenchResult:
    torch.manual_seed(args.seed)
    model = TinyLLM(dim)
    requests = random_requests(
        args.requests, dim=dim, prompt_lens=(4, args.max_prompt), output_lens=(1, args.max_output),
        cache=cache, block_size=args.block_size, seed=args.seed,
    )
    scheduler = Scheduler(model, args.budget, args.chunk, executor=executor)
    profiler = DetailedMemoryProfiler()
    profiler.set_baseline()
    start = time.perf_counter()
    with profiler.profile_context("run"):
        history = run_workload(scheduler, [(0, req) for req in requests])
    wall = time.perf_counter() - start
    return BenchResult(
        dim, cache, executor, len(history), wall,
        sum(len(r.generated_tokens) for r in requests), sum(s["total_tokens"] for s in history),
        profiler.context_deltas["run"]["rss_delta_mb"], process_peak_rss_mb(),
    )


def workload_main(args: argparse.Namespace) -> int:
    print(f"cb-lab bench: {args.requests} requests, prompts 4..{args.max_prompt}, outputs 1..{args.max_output}, "
          f"budget {args.budget}, chunk {args.chunk}, block size {args.block_size}, seed {args.seed}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(f"{'dim':>5} {'cache':>6} {'executor':>8} {'steps':>6} {'wall s':>8} {'gen tok/s':>10} {'all tok/s':>10} "
          f"{'RSS +MB':>8} {'peak MB':>8}")
    by_key = {}
    for dim in args.dims:
        for cache in args.caches:
            for executor in args.executors:
                r = by_key[(dim, cache, executor)] = run_one(args, dim, cache, executor)
                print(f"{r.dim:5d} {r.cache:>6} {r.executor:>8} {r.steps:6d} {r.wall_s:8.2f} "
                      f"{r.generated_per_s:10,.0f} {r.tokens_per_s:10,.0f} {r.rss_delta_mb:8.1f} {r.peak_rss_mb:8.0f}")
    for dim in args.dims:
        for executor in args.executors:
            if (dim, "dense", executor) in by_key and (dim, "paged", executor) in by_key:
                ratio = by_key[(dim, "dense", executor)].wall_s / by_key[(dim, "paged", executor)].wall_s
                print(f"dim {dim}, {executor}: paged runs at {ratio:.2f}x the speed of dense (dense wall / paged wall)")
        for cache in args.caches:
            if (dim, cache, "fused") in by_key and (dim, cache, "split") in by_key:
                ratio = by_key[(dim, cache, "split")].wall_s / by_key[(dim, cache, "fused")].wall_s
                print(f"dim {dim}, {cache}: fused runs at {ratio:.2f}x the speed of split (split wall / fused wall)")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("workload", help="a seeded workload to completion (the default)")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--dims", type=int, nargs="+", default=[16, 1024])
    p.add_argument("--caches", nargs="+", choices=("dense", "paged"), default=["dense", "paged"])
    p.add_argument("--executors", nargs="+", choices=sorted(EXECUTORS), default=["fused"])
    p.add_argument("--budget", type=int, default=64, help="max_tokens_per_step (default 64)")
    p.add_argument("--chunk", type=int, default=16, help="prefill_chunk_size (default 16)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=64)
    p.add_argument("--max-output", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="16 requests, dim 16 only, short sequences")
    p.set_defaults(main=workload_main, apply_quick=apply_quick)


def apply_quick(args: argparse.Namespace) -> None:
    args.requests, args.dims, args.max_prompt, args.max_output = 16, [16], 16, 8
