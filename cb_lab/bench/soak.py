"""``python -m cb_lab.bench soak``: a long run of continuous arrivals, watched for drift.

20,000 steps (``--steps``) of Poisson arrivals (``--rate`` requests per step; prompts 4..32
rows, outputs lognormal with median 8, at most 64 tokens) on one shared block pool, then the
last requests drain. Requests are built the step they arrive and dropped once they finish
(every 100th is checked against the oracle when it finishes, then dropped too), so nothing
outlives its request but the engine's own state. Per tenth of the run: tokens per second and the process RSS.
Then ``MemoryLeakDetector``'s verdict (baseline: the end of the first tenth, the warm-up), the
pool (it must be free again), and the last tenth's throughput over the first's.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from cb_lab.bench.common import ratio
from cb_lab.core.block_pool import BlockPool
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.model.oracle import oracle_error
from cb_lab.model.tiny_llm import TinyLLM
from cb_lab.monitoring.memory_profiler import MemoryLeakDetector, make_memory_reader
from cb_lab.workload import LengthDist, WorkloadConfig, build_requests, generate_workload
from cb_lab.workload_io import RequestSpec

__all__ = ["add_parser"]


@dataclass(slots=True)
class Tenth:
    """One tenth of the run's steps."""

    tokens: int = 0
    seconds: float = 0.0  # summed step durations
    rss_mb: float = 0.0  # at its end

    @property
    def tokens_per_s(self) -> float:
        return ratio(self.tokens, self.seconds)


@dataclass(slots=True)
class SoakRun:
    tenths: list[Tenth] = field(default_factory=list)
    finished: int = 0
    checked: int = 0  # requests checked against the oracle
    max_error: float = 0.0  # their largest |batched - naive|
    preemptions: int = 0
    drain_steps: int = 0


def arrivals_by_step(args: argparse.Namespace) -> dict[int, list[RequestSpec]]:
    config = WorkloadConfig(int(args.rate * args.steps), LengthDist.uniform(4, 32),
                            LengthDist.lognormal(8, 1.0, maximum=64), "poisson", args.rate, seed=args.seed)
    by_step: dict[int, list[RequestSpec]] = defaultdict(list)
    for spec in generate_workload(config):
        if spec.arrival_step < args.steps:
            by_step[spec.arrival_step].append(spec)
    return by_step


def soak(args: argparse.Namespace, model: TinyLLM, pool: BlockPool, detector: MemoryLeakDetector) -> SoakRun:
    sched = Scheduler(model, args.budget, args.chunk, max_num_seqs=args.max_num_seqs)
    by_step, run, read_rss = arrivals_by_step(args), SoakRun(), make_memory_reader()
    tenth = max(args.steps // 10, 1)
    added, watched = 0, []  # watched: every 100th request, until it finishes
    for step in range(args.steps):
        if step % tenth == 0:
            run.tenths.append(Tenth())
        if specs := by_step.pop(step, None):
            for _, req in build_requests(specs, dim=model.dim, cache="shared", block_size=pool.block_size,
                                         seed=args.seed + step, pool=pool):
                sched.add_request(req)
                if added % 100 == 0:
                    watched.append(req)
                added += 1
        stats = sched.step()
        run.tenths[-1].tokens += stats["total_tokens"]
        run.tenths[-1].seconds += stats["step_duration"]
        if (step + 1) % tenth == 0:
            watched = check_finished(model, watched, run)
            run.tenths[-1].rss_mb = read_rss()
            detector.set_baseline() if len(run.tenths) == 1 else detector.record_measurement(f"step {step + 1}")
    run.drain_steps = len(sched.run_until_complete())
    check_finished(model, watched, run)
    run.finished = sched.num_finished
    run.preemptions = sched.num_preemptions
    return run


def check_finished(model: TinyLLM, watched: list[Request], run: SoakRun) -> list[Request]:
    """Check the finished ones against the oracle, forget them; returns those still running."""
    done = [r for r in watched if r.finished]
    run.checked += len(done)
    run.max_error = max(run.max_error, oracle_error(model, done))
    return [r for r in watched if not r.finished]


def soak_main(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    model = TinyLLM(args.dim)
    pool = BlockPool(args.num_blocks, args.block_size, args.dim)
    detector = MemoryLeakDetector(threshold_mb=args.leak_mb)
    start = time.perf_counter()
    run = soak(args, model, pool, detector)
    wall = time.perf_counter() - start
    print(f"cb-lab bench soak: {args.steps:,} steps of Poisson arrivals (rate {args.rate}/step, prompts 4..32, "
          f"outputs lognormal median 8, <= 64), budget {args.budget}, chunk {args.chunk}, max_num_seqs "
          f"{args.max_num_seqs}, one pool of {args.num_blocks} blocks x {args.block_size}, dim {args.dim}, seed "
          f"{args.seed}; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(f"{'tenth':>5} {'tokens':>9} {'step s':>8} {'tok/s':>9} {'RSS MB':>8}")
    for i, t in enumerate(run.tenths):
        print(f"{i + 1:>5} {t.tokens:>9,} {t.seconds:>8.2f} {t.tokens_per_s:>9,.0f} {t.rss_mb:>8.1f}")
    leak = detector.check_for_leaks()
    first, last = run.tenths[0], run.tenths[-1]
    print(f"\n{run.finished:,} requests finished ({run.drain_steps} steps to drain the last), {run.preemptions:,} "
          f"preemptions, wall {wall:.1f} s")
    print(f"memory: leak detector {leak['status']!r}, RSS growth after warm-up {leak['growth_mb']:+.1f} MB "
          f"(median of the last quarter of the measurements minus the first tenth's end; threshold "
          f"{args.leak_mb} MB)")
    print(f"pool after drain: {pool.stats()}")
    drift = ratio(last.tokens_per_s, first.tokens_per_s)
    print(f"throughput: last tenth {last.tokens_per_s:,.0f} tok/s = {drift:.3f}x the first tenth's "
          f"{first.tokens_per_s:,.0f}")
    print(f"oracle: {run.checked} requests checked as they finished, max |batched - naive| = {run.max_error:.1e}")
    return 0 if run.max_error < 1e-4 and pool.num_used_blocks == 0 else 1


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("soak", help="a long run of continuous arrivals: memory, the pool, throughput over time")
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--rate", type=float, default=1.0, help="mean arrivals per step (default 1.0)")
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--num-blocks", type=int, default=96)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--leak-mb", type=float, default=5.0, help="RSS growth that counts as a leak (default 5 MB)")
    p.add_argument("--quick", action="store_true", help="1,000 steps")
    p.set_defaults(main=soak_main, apply_quick=apply_quick)


def apply_quick(args: argparse.Namespace) -> None:
    args.steps = 1_000
