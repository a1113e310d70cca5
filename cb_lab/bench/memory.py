"""``python -m cb_lab.bench memory``: KV slots allocated vs used, shared pool vs dense preallocation.

A workload with lognormal output lengths, for the shared block pool (measured) and a dense
buffer per request preallocated to its maximum length (the pre-vLLM way, computed over the
same steps).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import torch

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.model.tiny_llm import TinyLLM

__all__ = ["add_parser"]


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


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    p.set_defaults(main=memory_main, apply_quick=apply_quick)


def apply_quick(args: argparse.Namespace) -> None:
    args.requests, args.max_output, args.median_output = 64, 128, 16
