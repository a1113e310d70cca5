"""``python -m cb_lab.bench [workload|fused|memory]``: benchmarks that print tables.

- ``workload`` (what runs without a subcommand): 256 seeded requests (prompts 4..64 rows,
  outputs 1..64 tokens) arrive at step 0 and run to completion under a token budget, for
  each model dim and cache layout asked for: steps, wall time, tokens/s, RSS growth.
- ``fused``: decode-only steps of 32 and 128 running requests, the fused executor (one
  forward per step) against the split one (one forward per decode token) on identical
  request sets, next to a *floor*: the 4 projection matmuls plus one read of every cached
  K/V row the step attends to. Also the scheduler's own bookkeeping per step.
- ``memory``: KV slots allocated vs used on a workload with lognormal output lengths, for
  the shared block pool (measured) and a dense buffer per request preallocated to its
  maximum length (the pre-vLLM way, computed over the same steps).

Every configuration runs in the same process, so compare them as ratios from one run.
``--quick`` shrinks each to a few seconds (tests run that). Shape letters: B running
requests, D model dim.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import EXECUTORS, Scheduler, check_blocks
from cb_lab.model.tiny_llm import TinyLLM
from cb_lab.monitoring.memory_profiler import DetailedMemoryProfiler, process_peak_rss_mb
from cb_lab.workload import random_requests, run_workload

__all__ = ["COMMANDS", "main", "parse_args"]

COMMANDS = ("workload", "fused", "memory")


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


# --- workload: a whole seeded workload, timed -------------------------------------------


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


# --- fused: decode steps, fused vs split vs the floor -------------------------------------


@dataclass(frozen=True, slots=True)
class StepTiming:
    """One step run the way ``Scheduler.step`` runs it, each phase timed (seconds)."""

    schedule_s: float  # schedule() + check_blocks()
    forward_s: float  # executor.run(plan): the model
    commit_s: float
    decode_tokens: int
    prefill_tokens: int

    @property
    def step_s(self) -> float:
        return self.schedule_s + self.forward_s + self.commit_s


def timed_steps(args: argparse.Namespace, dim: int) -> int:
    """``--steps`` or by dim: a dim-4096 split step reads 256 MB of weights per decode token."""
    return int(args.steps or (20 if dim <= 256 else 10 if dim <= 1024 else 3))


def _now(device: torch.device) -> float:
    """``perf_counter`` once the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed_step(sched: Scheduler) -> StepTiming:
    device = sched.model.device
    t0 = _now(device)
    plan = sched.schedule()
    check_blocks(plan)
    t1 = _now(device)
    result = sched.executor.run(plan)
    t2 = _now(device)
    sched.commit(plan, result)
    t3 = _now(device)
    return StepTiming(t1 - t0, t2 - t1, t3 - t2, plan.num_decode_tokens, plan.num_prefill_tokens)


def decoding_schedulers(model: TinyLLM, contexts: list[int], args: argparse.Namespace) -> dict[str, Scheduler]:
    """One scheduler per executor over identical requests (prompts of ``contexts`` rows), all decoding.

    The prefill is untimed: one set runs it (fused executor, a big budget), the other set is a
    deep copy of the result (its own requests, caches and shared pool, bitwise equal), which
    halves the slowest untimed part at dim 4096. Each scheduler then gets a fresh executor, so
    ``num_model_calls`` counts the timed steps only.
    """
    budget, extra = len(contexts) + 4096, timed_steps(args, model.dim) + 64  # extra: decodes a request may run
    pool = BlockPool(sum(-(-(n + extra) // args.block_size) for n in contexts), args.block_size, model.dim,
                     device=model.device)
    gen = torch.Generator().manual_seed(args.seed)
    sched = Scheduler(model, budget, max(contexts))
    for i, n in enumerate(contexts):
        prompt = torch.randn(n, model.dim, generator=gen).to(model.device)
        sched.add_request(Request(f"r{i:03d}", prompt, extra, PagedKVCache(args.block_size, pool=pool)))
    while any(r.in_prefill for r in sched.active):
        sched.step()
    assert len(sched.active) == len(contexts), "a request finished during prefill; raise its max_new_tokens"
    twin = Scheduler(model, budget, max(contexts))
    twin.running, twin.step_id = copy.deepcopy(sched.running), sched.step_id
    for req in twin.running:
        req.kv_cache.hooks = twin.plugins.cache_plugins  # what add_request would have set
    scheds = {"split": twin, "fused": sched}
    for name, s in scheds.items():
        s.executor = EXECUTORS[name](model)
    return scheds


@torch.no_grad()
def floor_s(model: TinyLLM, requests: Sequence[Request]) -> tuple[float, float]:
    """Least work of a decode step: ``x [B, D] @ W^T`` for q, k, v, o, plus one gather of every cached row.

    Timed twice (medians of 3): gathering into buffers written beforehand (the floor), and into
    fresh tensors as ``pool.key_cache[ids]`` does; a fresh tensor of many MB pays a page fault
    per 4 KiB page on first touch, and the fused step's own gathers are fresh tensors too.
    """
    caches = [r.kv_cache for r in requests if isinstance(r.kv_cache, PagedKVCache)]
    pool = caches[0].pool
    assert pool is not None and len(caches) == len(requests)
    x = torch.stack([r.last_token for r in requests])  # [B, D]
    ids = torch.tensor([b for c in caches for b in c.block_table], device=model.device)
    weights = [p.weight for p in (model.q_proj, model.k_proj, model.v_proj, model.o_proj)]
    out_k, out_v = (torch.zeros((len(ids), *pool.key_cache.shape[1:]), device=model.device) for _ in range(2))

    def once(fresh: bool) -> float:
        start = _now(model.device)
        for w in weights:
            x @ w.T
        if fresh:
            pool.key_cache[ids], pool.value_cache[ids]  # [blocks, block_size, D]: every cached row, read once
        else:
            torch.index_select(pool.key_cache, 0, ids, out=out_k)
            torch.index_select(pool.value_cache, 0, ids, out=out_v)
        return _now(model.device) - start

    return statistics.median(once(False) for _ in range(3)), statistics.median(once(True) for _ in range(3))


@dataclass(frozen=True, slots=True)
class FusedRow:
    """Medians over the timed steps of one executor on one configuration."""

    dim: int
    running: int
    context: float  # mean cached rows per request at the first timed step
    gathered: float  # K/V rows attention gathers per cached row (whole blocks: the last one's empty tail)
    executor: str
    steps: int
    decode_tokens: float  # per step
    prefill_tokens: float
    calls: float  # model calls per step
    step_s: float
    forward_s: float
    schedule_s: float
    commit_s: float
    bookkeeping_s: float
    floor_s: float  # gathers into buffers touched beforehand
    fresh_floor_s: float  # gathers into new tensors


def run_fused_config(args: argparse.Namespace, dim: int, running: int) -> dict[str, FusedRow]:
    torch.manual_seed(args.seed)
    model = TinyLLM(dim).to(args.device)
    gen = torch.Generator().manual_seed(args.seed + running)
    contexts = torch.randint(args.contexts[0], args.contexts[1] + 1, (running,), generator=gen).tolist()
    scheds = decoding_schedulers(model, contexts, args)
    for sched in scheds.values():
        timed_step(sched)  # warm-up, untimed
        sched.executor.num_model_calls = 0
    context = statistics.fmean(len(r.kv_cache) for r in scheds["fused"].active)
    gathered = gathered_per_cached_row(scheds["fused"].active)
    timings: dict[str, list[StepTiming]] = {name: [] for name in scheds}
    floors = []
    for _ in range(timed_steps(args, dim)):  # interleaved, so a busy neighbour slows all alike
        floors.append(floor_s(model, scheds["fused"].active))
        for name, sched in scheds.items():
            timings[name].append(timed_step(sched))
    floor = (statistics.median(f for f, _ in floors), statistics.median(f for _, f in floors))
    return {name: _fused_row(dim, running, (context, gathered), name, timings[name],
                             scheds[name].executor.num_model_calls, floor) for name in scheds}


def gathered_per_cached_row(requests: Sequence[Request]) -> float:
    """K/V rows attention gathers per cached row: whole blocks, so the tail of each last block too.

    Both executors gather only the blocks in use (the fused one never pads a block table to the
    longest request), so this is one number for both.
    """
    caches = [r.kv_cache for r in requests if isinstance(r.kv_cache, PagedKVCache)]
    blocks, rows = sum(len(c.block_table) for c in caches), sum(len(c) for c in caches)
    return blocks * caches[0].block_size / rows


def _fused_row(dim: int, running: int, context: tuple[float, float], name: str, ts: list[StepTiming],
               calls: int, floor: tuple[float, float]) -> FusedRow:
    med = statistics.median
    return FusedRow(
        dim, running, *context, name, len(ts), statistics.fmean(t.decode_tokens for t in ts),
        statistics.fmean(t.prefill_tokens for t in ts), calls / len(ts), med(t.step_s for t in ts),
        med(t.forward_s for t in ts), med(t.schedule_s for t in ts), med(t.commit_s for t in ts),
        med(t.schedule_s + t.commit_s for t in ts), *floor,
    )


FUSED_HEADER = (f"{'dim':>5} {'running':>7} {'ctx':>5} {'gather':>6} {'executor':>8} {'steps':>5} {'decode':>6} "
                f"{'prefill':>7} {'calls':>6} {'step ms':>9} {'fwd ms':>9} {'decode tok/s':>12} {'vs split':>8} "
                f"{'floor ms':>9} {'step/floor':>10} {'fresh-floor ms':>14}")


def print_fused(rows: list[dict[str, FusedRow]]) -> None:
    print(FUSED_HEADER)
    for pair in rows:
        for r in pair.values():
            print(f"{r.dim:5d} {r.running:7d} {r.context:5.0f} {r.gathered:5.2f}x {r.executor:>8} {r.steps:5d} "
                  f"{r.decode_tokens:6.0f} {r.prefill_tokens:7.0f} {r.calls:6.1f} {r.step_s * 1e3:9.2f} "
                  f"{r.forward_s * 1e3:9.2f} {_ratio(r.decode_tokens, r.step_s):12,.0f} "
                  f"{_ratio(pair['split'].step_s, r.step_s):7.2f}x {r.floor_s * 1e3:9.2f} "
                  f"{_ratio(r.step_s, r.floor_s):9.2f}x {r.fresh_floor_s * 1e3:14.2f}")
    print("\nscheduler bookkeeping per step (fused executor): schedule() + check_blocks() and commit() vs the model")
    print(f"{'dim':>5} {'running':>7} {'schedule ms':>11} {'commit ms':>9} {'bookkeeping ms':>14} "
          f"{'us/request':>10} {'fwd ms':>9} {'bookkeeping/fwd':>15}")
    for pair in rows:
        r = pair["fused"]
        print(f"{r.dim:5d} {r.running:7d} {r.schedule_s * 1e3:11.3f} {r.commit_s * 1e3:9.3f} "
              f"{r.bookkeeping_s * 1e3:14.3f} {r.bookkeeping_s * 1e6 / r.running:10.1f} {r.forward_s * 1e3:9.2f} "
              f"{_ratio(r.bookkeeping_s, r.forward_s):14.2f}x")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def fused_main(args: argparse.Namespace) -> int:
    print(f"cb-lab bench fused: decode-only steps, {args.running} running requests, contexts "
          f"{args.contexts[0]}..{args.contexts[1]} rows (seed {args.seed}), dims {args.dims}, block size "
          f"{args.block_size}; timed steps per dim: {', '.join(f'{d}: {timed_steps(args, d)}' for d in args.dims)} "
          f"(after 1 warm-up, medians); torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {_device_name(args.device)}\n")
    rows = []
    start = time.perf_counter()
    for dim in args.dims:
        for running in args.running:
            rows.append(run_fused_config(args, dim, running))
    print_fused(rows)
    print(f"\nwall time {time.perf_counter() - start:.1f} s (prefill included)")
    return 0


# --- memory: KV slots allocated vs used ----------------------------------------------------


def skewed_requests(args: argparse.Namespace, dim: int) -> list[Request]:
    """Uniform prompts, lognormal outputs (a long tail, as real chats have), one shared pool for all."""
    gen = torch.Generator().manual_seed(args.seed)
    n = args.requests
    prompts = torch.randint(args.prompts[0], args.prompts[1] + 1, (n,), generator=gen).tolist()
    outputs = torch.empty(n).log_normal_(math.log(args.median_output), args.sigma, generator=gen)
    new_tokens = outputs.round().clamp(1, args.max_output).long().tolist()
    pool = BlockPool(sum(-(-(p + o) // args.block_size) for p, o in zip(prompts, new_tokens)), args.block_size, dim)
    return [
        Request(f"r{i:03d}", torch.randn(p, dim, generator=gen), o, PagedKVCache(args.block_size, pool=pool))
        for i, (p, o) in enumerate(zip(prompts, new_tokens))
    ]


@dataclass(frozen=True, slots=True)
class SlotTrace:
    """Per step, after its commit: running requests (holding rows), rows held, slots allocated per layout."""

    running: list[int]
    used: list[int]
    allocated: dict[str, list[int]]  # layout -> slots


def trace_memory(args: argparse.Namespace) -> tuple[SlotTrace, list[Request]]:
    torch.manual_seed(args.seed)
    model = TinyLLM(args.dim)
    requests = skewed_requests(args, args.dim)
    pool = requests[0].kv_cache.pool if isinstance(requests[0].kv_cache, PagedKVCache) else None
    assert pool is not None
    sched = Scheduler(model, args.budget, args.chunk)
    for req in requests:
        sched.add_request(req)
    trace = SlotTrace([], [], {"shared pool": [], "dense prealloc": []})
    while sched.active:
        sched.step()
        running = [r for r in sched.active if len(r.kv_cache) > 0]  # admitted: holds rows
        assert pool.num_tokens == sum(len(r.kv_cache) for r in running)
        trace.running.append(len(running))
        trace.used.append(pool.num_tokens)
        trace.allocated["shared pool"].append(pool.num_used_blocks * pool.block_size)
        trace.allocated["dense prealloc"].append(sum(r.prompt_len + r.max_new_tokens for r in running))
    return trace, requests


def print_memory(trace: SlotTrace, block_size: int) -> None:
    print(f"{'layout':<15} {'peak slots':>10} {'used then':>10} {'waste at peak':>13} {'avg waste':>9} "
          f"{'waste blocks/req':>16} {'worst step':>10}")
    steps = [i for i, n in enumerate(trace.running) if n > 0]
    for layout, alloc in trace.allocated.items():
        peak = max(steps, key=lambda i: alloc[i])
        waste = [alloc[i] - trace.used[i] for i in steps]
        per_req = [w / block_size / trace.running[i] for w, i in zip(waste, steps)]
        print(f"{layout:<15} {alloc[peak]:10,d} {trace.used[peak]:10,d} "
              f"{100 * (alloc[peak] - trace.used[peak]) / alloc[peak]:12.1f}% "
              f"{100 * sum(waste) / sum(alloc[i] for i in steps):8.1f}% {statistics.fmean(per_req):16.2f} "
              f"{max(per_req):10.2f}")
    pool_peak, dense_peak = (max(a) for a in trace.allocated.values())
    print(f"\ndense preallocation needs {dense_peak / pool_peak:.2f}x the slots of the shared pool at peak "
          f"({dense_peak:,d} vs {pool_peak:,d}); waste blocks are {block_size}-slot units")


def memory_main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    trace, requests = trace_memory(args)
    outs = sorted(r.max_new_tokens for r in requests)
    print(f"cb-lab bench memory: {args.requests} requests at step 0, prompts {args.prompts[0]}..{args.prompts[1]}, "
          f"outputs lognormal (median {args.median_output}, sigma {args.sigma}, 1..{args.max_output}): drawn "
          f"median {outs[len(outs) // 2]}, mean {statistics.fmean(outs):.0f}, max {outs[-1]}; budget {args.budget}, "
          f"chunk {args.chunk}, block size {args.block_size}, dim {args.dim}, seed {args.seed}; "
          f"{len(trace.used)} steps, peak {max(trace.running)} running\n")
    print_memory(trace, args.block_size)
    print(f"wall time {time.perf_counter() - start:.1f} s")
    return 0


# --- command line -------------------------------------------------------------------------


def _add_workload(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    p.set_defaults(main=workload_main)


def _add_fused(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("fused", help="decode steps: fused vs split executor vs the floor")
    p.add_argument("--dims", type=int, nargs="+", default=[16, 1024, 4096])
    p.add_argument("--running", type=int, nargs="+", default=[32, 128], help="decoding requests per step")
    p.add_argument("--contexts", type=int, nargs=2, default=[64, 512], metavar=("LO", "HI"),
                   help="prompt rows per request, drawn uniformly (default 64 512)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per config (default 20/10/3 by dim)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--device", type=_device, default=torch.device("cpu"),
                   help="cpu (default) or cuda: model, pool and prompts live there; timings synchronize")
    p.add_argument("--quick", action="store_true", help="dims 16 and 64, 4 and 8 running, contexts 8..32")
    p.set_defaults(main=fused_main)


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device: {e}") from None
    if device.type not in ("cpu", "cuda") or device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} is not available here; use cpu or an available cuda")
    return device


def _add_memory(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("memory", help="KV slots allocated vs used: shared pool vs dense preallocation")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompts", type=int, nargs=2, default=[16, 128], metavar=("LO", "HI"))
    p.add_argument("--median-output", type=int, default=48)
    p.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of output lengths (default 1.0)")
    p.add_argument("--max-output", type=int, default=1024)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="64 requests, outputs up to 128")
    p.set_defaults(main=memory_main)


def _apply_quick(args: argparse.Namespace) -> None:
    if args.command == "workload":
        args.requests, args.dims, args.max_prompt, args.max_output = 16, [16], 16, 8
    elif args.command == "fused":
        args.dims, args.running, args.contexts, args.steps = [16, 64], [4, 8], [8, 32], 2
    else:
        args.requests, args.max_output, args.median_output = 64, 128, 16


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cb_lab.bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", metavar="{workload,fused,memory}")
    for add in (_add_workload, _add_fused, _add_memory):
        add(sub)
    for parser in sub.choices.values():
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--threads", type=int, default=None,
                            help="torch.set_num_threads (default: torch's); 1 keeps a busy neighbour core from "
                                 "stalling every parallel op")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "workload")  # no subcommand: the original workload benchmark
    args = p.parse_args(argv)
    if args.quick:
        _apply_quick(args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run: Callable[[argparse.Namespace], int] = args.main
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
