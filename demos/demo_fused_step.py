"""Phase 9: one forward per step: the same requests through the split and the fused executor.

Split runs a step as one ragged prefill forward plus one ``forward_decode`` per decode token;
fused runs all the step's tokens (decode rows, then prefill rows) through ONE
``TinyLLM.forward_fused`` call, reading the weights once per step. Each run keeps its K/V in one
shared ``BlockPool``: many requests' blocks side by side, a finished request's blocks free at once.

Look at: model calls per step, identical tokens, compute times, the pool grid. Try ``--dim 1024``.
"""

from __future__ import annotations

import timeit
from functools import partial

import torch

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.executor import EXECUTORS
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.model.oracle import oracle_error
from demos._common import demo_parser, fmt_diff, make_model

QUICK_REQUESTS = [("a", 6, 4), ("b", 10, 3), ("c", 3, 6), ("d", 7, 5)]  # (req_id, prompt_len, max_new_tokens)
FULL_REQUESTS = QUICK_REQUESTS + [("e", 14, 8), ("f", 5, 12), ("g", 9, 7), ("h", 4, 10)]
BLOCK_SIZE, BUDGET, CHUNK = 4, 8, 4


def pool_view(pool: BlockPool, requests: list[Request], last_owner: dict[int, str]) -> list[str]:
    """Block tables, then per block id: its owner's id per filled slot, ``.`` per empty one, or ``free``."""
    rows, tables = dict.fromkeys(range(pool.num_blocks), "free"), []
    for req in requests:
        cache = req.kv_cache
        assert isinstance(cache, PagedKVCache)
        tables += [f"{req.req_id} {cache.block_table}"] if cache.block_table else []
        for i, b in enumerate(cache.block_table):
            filled = min(BLOCK_SIZE, len(cache) - i * BLOCK_SIZE)
            previous, last_owner[b] = last_owner.get(b, req.req_id), req.req_id
            was = f"   <- was {previous}'s" if previous != req.req_id else ""  # a freed block, reused
            rows[b] = " ".join([req.req_id] * filled + ["."] * (BLOCK_SIZE - filled)) + was
    return ["block tables: " + ", ".join(tables), *(f"block {b:>2}: {row}" for b, row in rows.items())]


def main(argv: list[str] | None = None) -> int:
    parser = demo_parser(__doc__)
    parser.add_argument("--dim", type=int, default=16, help="model width (1024 shows the real speed gap)")
    args = parser.parse_args(argv)
    specs = QUICK_REQUESTS if args.quick else FULL_REQUESTS
    model = make_model(args.dim, args.seed)
    prompts = [(r, torch.randn(n, args.dim), k) for r, n, k in specs]
    num_blocks = sum(-(-(n + k - 1) // BLOCK_SIZE) for _, n, k in specs)  # room for every request at once
    pools = {name: BlockPool(num_blocks, BLOCK_SIZE, args.dim) for name in ("split", "fused")}
    runs = {name: [Request(r, p, n, PagedKVCache(BLOCK_SIZE, pool=pool)) for r, p, n in prompts]
            for name, pool in pools.items()}
    scheds = {name: Scheduler(model, BUDGET, CHUNK, executor=name) for name in runs}
    for name, reqs in runs.items():
        for req in reqs:
            scheds[name].add_request(req)
    print(f"{len(specs)} requests, dim {args.dim}, budget {BUDGET}, chunk {CHUNK}, {num_blocks} blocks per pool\n")
    seconds, last_owner, shown = dict.fromkeys(runs, 0.0), dict[int, str](), list[str]()
    while scheds["fused"].active:
        before = {name: sched.executor.num_model_calls for name, sched in scheds.items()}
        for name, sched in scheds.items():  # the same step on both executors, side by side
            plan, spare = sched.schedule(), EXECUTORS[name](model)  # run(plan) writes nothing: time it, best of 3
            seconds[name] += min(timeit.repeat(partial(spare.run, plan), number=1, repeat=3))
            sched.step()
        calls = {name: sched.executor.num_model_calls - before[name] for name, sched in scheds.items()}
        print(f"step {plan.step_id:>2} | {plan.num_decode_tokens} decode + {plan.num_prefill_tokens} prefill | "
              f"model calls: split {calls['split']}, fused {calls['fused']}")
        view = pool_view(pools["fused"], runs["fused"], last_owner)
        if not shown and any("<- was" in row for row in view):  # the first step that reuses a freed block
            s = pools["fused"].stats()
            shown = [f"the fused run's shared pool after step {plan.step_id}: {s['used_blocks']}/{s['num_blocks']} "
                     f"blocks used, {s['tokens_stored']} tokens stored, {s['unused_slots']} unused slots", *view]
    split, fused = (torch.stack([t for r in runs[name] for t in r.generated_tokens]) for name in ("split", "fused"))
    print(f"\nall {len(fused)} generated tokens: {fmt_diff((split - fused).abs().max().item(), 'split - fused')}")
    print("\n".join(f"{name} vs the oracle: {fmt_diff(oracle_error(model, reqs))}" for name, reqs in runs.items()))
    print(f"model calls in total: split {scheds['split'].executor.num_model_calls}, "
          f"fused {scheds['fused'].executor.num_model_calls}")
    print(f"compute wall time (this run, side by side, best of 3 per step): split {seconds['split'] * 1e3:.1f} ms, "
          f"fused {seconds['fused'] * 1e3:.1f} ms; fused runs {seconds['split'] / seconds['fused']:.2f}x as fast")
    if args.dim < 256:
        print("  (tiny and noisy: at this size Python overhead, not reading weights, sets the time; try --dim 1024)")
    elif args.quick:
        print("  (--quick: few, short requests; drop it for steps with more decodes)")
    print("\n" + "\n".join(shown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
