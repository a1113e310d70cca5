"""Phase 11: admission, preemption and the serving metrics, on a small shared block pool.

Requests wait in ``scheduler.waiting`` until the planner admits them, which it does only while
the budget, ``max_num_seqs`` and the pool's free blocks (the whole prefill must fit) allow; who
waits, and why, is in ``plan.skipped``. A running decode or prefill chunk that finds no free block
preempts the running request that arrived last: its blocks go back, it waits ahead of new requests, and
later re-prefills its prompt plus the tokens it had made. Its tokens stay exact (the oracle).

Look at: each step's plan, who waits and why, the pool, each request's latencies in steps.
Try: ``--num-blocks 16`` (no preemption) or ``--max-num-seqs 2`` (more waiting).
"""

from __future__ import annotations

import torch

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.model.oracle import oracle_error
from cb_lab.model.tiny_llm import TinyLLM
from cb_lab.monitoring.metrics import MetricsCollector
from cb_lab.monitoring.trace import TracePlugin
from cb_lab.plugins.base import PluginManager
from cb_lab.plugins.builtin import MetricsPlugin
from cb_lab.workload import run_workload
from demos._common import demo_parser, make_model

QUICK_REQUESTS = [("a", 0, 6, 6), ("b", 0, 5, 5), ("c", 0, 4, 3), ("d", 1, 3, 3), ("e", 2, 7, 2)]  # (id, arrival,
FULL_REQUESTS = QUICK_REQUESTS + [("f", 3, 9, 4), ("g", 4, 2, 6), ("h", 6, 5, 3)]  # prompt_len, max_new_tokens)
DIM, BLOCK_SIZE, BUDGET, CHUNK = 8, 4, 8, 4


def run(model: TinyLLM, specs: list[tuple[str, int, int, int]], num_blocks: int,
        max_num_seqs: int | None) -> tuple[Scheduler, list[Request], TracePlugin, MetricsPlugin, BlockPool]:
    """Run ``specs`` to the end on ONE shared pool; the trace and the metrics are recorded by plugins."""
    pool = BlockPool(num_blocks, BLOCK_SIZE, DIM)
    trace, metrics = TracePlugin(), MetricsPlugin(MetricsCollector(enable_memory_profiling=False))
    plugins = PluginManager()
    plugins.register_scheduler_plugin(trace)
    plugins.register_scheduler_plugin(metrics)
    sched = Scheduler(model, BUDGET, CHUNK, plugins=plugins, max_num_seqs=max_num_seqs)
    requests = [Request(r, torch.randn(n, DIM), k, PagedKVCache(BLOCK_SIZE, pool=pool)) for r, _, n, k in specs]
    run_workload(sched, [(a, req) for (_, a, _, _), req in zip(specs, requests)])
    return sched, requests, trace, metrics, pool


def main(argv: list[str] | None = None) -> int:
    parser = demo_parser(__doc__)
    parser.add_argument("--num-blocks", type=int, default=6, help="blocks of the shared pool (4 rows each)")
    parser.add_argument("--max-num-seqs", type=int, default=3, help="running requests at most")
    args = parser.parse_args(argv)
    specs = QUICK_REQUESTS if args.quick else FULL_REQUESTS
    model = make_model(DIM, args.seed)
    sched, requests, trace, metrics, pool = run(model, specs, args.num_blocks, args.max_num_seqs)
    print(f"{len(specs)} requests (id arrival prompt/max_new: "
          + ", ".join(f"{r} {a} {n}/{k}" for r, a, n, k in specs) + ")")
    print(f"budget {BUDGET}, chunk {CHUNK}, max_num_seqs {args.max_num_seqs}, "
          f"one pool of {args.num_blocks} blocks x {BLOCK_SIZE} rows\n")
    for s in trace.steps:  # the trace keeps each step's plan: decode, prefill, admitted, preempted, skipped
        used, total = s.pool_used_blocks or 0, s.pool_num_blocks or 0
        line = (f"step {s.step_id:>2} | decode [{' '.join(s.decode)}] | prefill ["
                + ", ".join(f"{r} {a}:{a + n}" for r, a, n in s.prefill) + "]")
        line += f" | admitted [{' '.join(s.admitted)}]" if s.admitted else ""
        line += f" | PREEMPTED [{' '.join(s.preempted)}]" if s.preempted else ""
        line += (" | waits: " + ", ".join(f"{r} ({why})" for r, why in s.skipped)) if s.skipped else ""
        print(line + f" | pool after: {used} used, {total - used} free")
    print(f"\npreemptions: {sched.num_preemptions}; the pool at the end: {pool.stats()}\n")
    print("request  queueing  TTFT  TPOT  e2e  preempted   (in steps)")
    for req in requests:
        m = metrics.collector.requests[req.req_id]
        tpot = f"{m.tpot_steps:.2f}" if m.tpot_steps is not None else "-"
        print(f"{req.req_id:<7} {m.queueing_steps:>9} {m.ttft_steps:>5} {tpot:>5} {m.e2e_steps:>4} "
              f"{req.num_preemptions:>10}")
    worst = oracle_error(model, requests)
    again = [r.req_id for r in requests if r.num_preemptions]
    print(f"\noracle: max |batched - naive| = {worst:.1e} over every request "
          f"(preempted and recomputed: {' '.join(again) or 'none'})")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
