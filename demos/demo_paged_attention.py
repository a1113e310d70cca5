"""Phases 5 and 6: a paged KV cache, and attention that reads it through its block table.

A ``PagedKVCache`` keeps K/V in fixed-size blocks of a ``BlockPool``: position ``p`` sits in block
``block_table[p // block_size]``, slot ``p % block_size``. Here every request draws from ONE shared
pool, so block tables interleave, and a finished request's blocks are free again in the step it ends.

Look at: the pool after each step, each block table after prefill and at the last decode (the last
step its rows are in the pool), empty slots (``_``) as ``--block-size`` changes, and three checks.
"""

from __future__ import annotations

import torch

from cb_lab.attention.dense_attention import scaled_dot_product_attention
from cb_lab.attention.paged_attention import paged_attention
from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import DenseKVCache, PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.model.oracle import oracle_error
from cb_lab.model.tiny_llm import TinyLLM
from cb_lab.workload import run_workload
from demos._common import demo_parser, fmt_diff, make_model

QUICK_REQUESTS = [("a", 5, 3), ("b", 9, 4), ("c", 2, 3)]  # (req_id, prompt_len, max_new_tokens >= 2)
FULL_REQUESTS = [("a", 13, 6), ("b", 30, 8), ("c", 4, 3), ("d", 21, 12)]


def look(req: Request) -> tuple[str, float]:
    """A cache's blocks (``_`` = empty slot), and max |paged_attention - dense attention over get_kv()|."""
    cache = req.kv_cache
    assert isinstance(cache, PagedKVCache) and cache.pool is not None
    size, used = cache.block_size, cache.num_blocks_used
    slots = [str(p) if p < len(cache) else "_" for p in range(used * size)]  # the position in each slot
    blocks = " ".join(f"{b}:[{' '.join(slots[i * size:(i + 1) * size])}]" for i, b in enumerate(cache.block_table))
    q, (k, v) = torch.randn(1, cache.pool.dim), cache.get_kv()  # get_kv() gathers the blocks into [len, D] copies
    out, _ = paged_attention(q, cache.pool.key_cache[0], cache.pool.value_cache[0],  # TinyLLM: one layer
                             torch.tensor([cache.block_table]), torch.tensor([len(cache)]))
    return (f"len {len(cache):>2} | unused slots {used * size - len(cache)} | block_table {cache.block_table} | "
            f"{blocks}", (out - scaled_dot_product_attention(q, k, v)[0]).abs().max().item())


def run(model: TinyLLM, prompts: list[tuple[str, torch.Tensor, int]],
        block_size: int) -> tuple[list[Request], list[str], dict[str, tuple[str, float]]]:
    """Run over one shared pool: the requests, a pool line per step, a ``look`` per cache and moment."""
    pool = BlockPool(sum(-(-(len(p) + n - 1) // block_size) for _, p, n in prompts), block_size, model.dim)
    requests = [Request(r, prompt, n, PagedKVCache(block_size, pool=pool)) for r, prompt, n in prompts]
    sched = Scheduler(model, max_tokens_per_step=8, prefill_chunk_size=4)
    for req in requests:
        sched.add_request(req)
    steps, views = list[str](), dict[str, tuple[str, float]]()
    while sched.active:
        plan = sched.schedule()  # the commit that finishes a request frees its blocks, so look before it
        views |= {f"{r.req_id} at last decode": look(r) for r in plan.decode
                  if r.max_new_tokens == len(r.generated_tokens) + 1}
        sched.step()
        views |= {f"{c.request.req_id} after prefill": look(c.request) for c in plan.prefill
                  if c.completes_prompt and not c.request.finished}
        done = " ".join(r.req_id for r in plan.decode if r.finished)
        steps.append(f"step {plan.step_id:>2} | " + ", ".join(f"{k} {v:>2}" for k, v in pool.stats().items())
                     + (f" | finished: {done} (its blocks are free again)" if done else ""))
    return requests, steps, views


def main(argv: list[str] | None = None) -> int:
    parser = demo_parser(__doc__)
    parser.add_argument("--block-size", type=int, default=4, help="token positions per block")
    args = parser.parse_args(argv)
    dim, specs = (8, QUICK_REQUESTS) if args.quick else (16, FULL_REQUESTS)
    model = make_model(dim, args.seed)
    prompts = [(r, torch.randn(n, dim), k) for r, n, k in specs]
    paged, steps, views = run(model, prompts, args.block_size)
    print(f"block_size {args.block_size}; prompt_len/max_new: " + ", ".join(f"{r} {n}/{k}" for r, n, k in specs))
    print("\none shared BlockPool, after each step:\n" + "\n".join(steps))
    for r, _, _ in specs:
        print("\n" + "\n".join(f"{r} {w:<14} | {views[f'{r} {w}'][0]}" for w in ("after prefill", "at last decode")))
    dense = [Request(r, prompt, n, DenseKVCache()) for r, prompt, n in prompts]
    run_workload(Scheduler(model, max_tokens_per_step=8, prefill_chunk_size=4), [(0, req) for req in dense])
    tokens = max((torch.stack(p.generated_tokens) - torch.stack(d.generated_tokens)).abs().max().item()
                 for p, d in zip(paged, dense))
    gap = fmt_diff(max(g for _, g in views.values()), "paged - dense")
    print(f"\npaged_attention vs dense attention over get_kv(): {gap}")
    print(f"tokens with paged caches vs dense caches:         {fmt_diff(tokens, 'paged - dense')}")
    print(f"paged run vs the oracle:                          {fmt_diff(oracle_error(model, paged))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
