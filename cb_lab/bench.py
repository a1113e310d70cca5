"""``python -m cb_lab.bench``: a seeded workload through the scheduler, timed.

256 requests (prompts 4..64 rows, outputs 1..64 tokens) all arrive at step 0 and run
to completion under a token budget, for each model dim and cache layout asked for.
Every configuration runs in the same process, one after the other, so compare them as
ratios from one run. Per configuration it prints steps, wall time, generated tokens/s,
all tokens/s (prefill + decode), the RSS growth of the run and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from cb_lab.core.scheduler import Scheduler
from cb_lab.model.tiny_llm import TinyLLM
from cb_lab.monitoring.memory_profiler import DetailedMemoryProfiler, process_peak_rss_mb
from cb_lab.workload import random_requests, run_workload


@dataclass(frozen=True, slots=True)
class BenchResult:
    dim: int
    cache: str
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


def run_one(args: argparse.Namespace, dim: int, cache: str) -> BenchResult:
    torch.manual_seed(args.seed)
    model = TinyLLM(dim)
    requests = random_requests(
        args.requests, dim=dim, prompt_lens=(4, args.max_prompt), output_lens=(1, args.max_output),
        cache=cache, block_size=args.block_size, seed=args.seed,
    )
    scheduler = Scheduler(model, args.budget, args.chunk)
    profiler = DetailedMemoryProfiler()
    profiler.set_baseline()
    start = time.perf_counter()
    with profiler.profile_context("run"):
        history = run_workload(scheduler, [(0, req) for req in requests])
    wall = time.perf_counter() - start
    return BenchResult(
        dim, cache, len(history), wall,
        sum(len(r.generated_tokens) for r in requests), sum(s["total_tokens"] for s in history),
        profiler.context_deltas["run"]["rss_delta_mb"], process_peak_rss_mb(),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cb_lab.bench", description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--dims", type=int, nargs="+", default=[16, 1024])
    p.add_argument("--caches", nargs="+", choices=("dense", "paged"), default=["dense", "paged"])
    p.add_argument("--budget", type=int, default=64, help="max_tokens_per_step (default 64)")
    p.add_argument("--chunk", type=int, default=16, help="prefill_chunk_size (default 16)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=64)
    p.add_argument("--max-output", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="16 requests, dim 16 only, short sequences")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.dims, args.max_prompt, args.max_output = 16, [16], 16, 8
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"cb-lab bench: {args.requests} requests, prompts 4..{args.max_prompt}, outputs 1..{args.max_output}, "
          f"budget {args.budget}, chunk {args.chunk}, block size {args.block_size}, seed {args.seed}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(f"{'dim':>5} {'cache':>6} {'steps':>6} {'wall s':>8} {'gen tok/s':>10} {'all tok/s':>10} "
          f"{'RSS +MB':>8} {'peak MB':>8}")
    results = []
    for dim in args.dims:
        for cache in args.caches:
            r = run_one(args, dim, cache)
            results.append(r)
            print(f"{r.dim:5d} {r.cache:>6} {r.steps:6d} {r.wall_s:8.2f} {r.generated_per_s:10,.0f} "
                  f"{r.tokens_per_s:10,.0f} {r.rss_delta_mb:8.1f} {r.peak_rss_mb:8.0f}")
    by_key = {(r.dim, r.cache): r for r in results}
    for dim in args.dims:
        if (dim, "dense") in by_key and (dim, "paged") in by_key:
            ratio = by_key[(dim, "dense")].wall_s / by_key[(dim, "paged")].wall_s
            print(f"dim {dim}: paged runs at {ratio:.2f}x the speed of dense (dense wall / paged wall)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
