"""Phases 5 and 6: a paged KV cache, and attention that reads it through its block table.

A ``PagedKVCache`` stores K/V in fixed-size blocks: position ``p`` is in block
``block_table[p // block_size]``, slot ``p % block_size``; only the last block has empty
slots. Each cache owns its own pool (4 blocks, doubling when full): "free" is its spares.

Look at: the block tables after prefill and after decode, the wasted slots (``_``) as you
change ``--block-size``, that ``paged_attention`` over the blocks equals dense attention
over ``cache.get_kv()``, and that paged and dense caches generate the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cb_lab.attention.dense_attention import scaled_dot_product_attention
from cb_lab.attention.paged_attention import paged_attention
from cb_lab.core.kv_cache import BaseKVCache, DenseKVCache, PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.model.tiny_llm import TinyLLM
from cb_lab.model.oracle import oracle_error
from demos._common import demo_parser, fmt_diff, make_model

QUICK_REQUESTS = [("a", 5, 3), ("b", 9, 4), ("c", 2, 2)]  # (req_id, prompt_len, max_new_tokens)
FULL_REQUESTS = [("a", 13, 6), ("b", 30, 8), ("c", 4, 3), ("d", 21, 12)]


def describe(cache: PagedKVCache) -> str:
    size, used = cache.block_size, cache.num_blocks_used
    slots = [str(p) if p < len(cache) else "_" for p in range(used * size)]  # the position in each slot
    blocks = " ".join(f"{b}:[{' '.join(slots[i * size:(i + 1) * size])}]" for i, b in enumerate(cache.block_table))
    return (f"len {len(cache):>2} | blocks used {used}, free {cache.num_blocks_free} | "
            f"wasted slots {used * size - len(cache)} | block_table {cache.block_table} | {blocks}")


def run(model: TinyLLM, prompts: list[tuple[str, torch.Tensor, int]],
        new_cache: Callable[[], BaseKVCache]) -> tuple[list[Request], dict[str, str]]:
    """Generate to completion; also returns each paged cache's description when its prompt was done."""
    requests = [Request(r, prompt, n, new_cache()) for r, prompt, n in prompts]
    sched = Scheduler(model, max_tokens_per_step=8, prefill_chunk_size=4)
    for req in requests:
        sched.add_request(req)
    after_prefill: dict[str, str] = {}
    while sched.active:
        sched.step()
        after_prefill |= {r.req_id: describe(r.kv_cache) for r in requests if isinstance(r.kv_cache, PagedKVCache)
                          and not r.in_prefill and r.req_id not in after_prefill}
    return requests, after_prefill


def main(argv: list[str] | None = None) -> int:
    parser = demo_parser(__doc__)
    parser.add_argument("--block-size", type=int, default=4, help="token positions per block")
    args = parser.parse_args(argv)
    dim, specs = (8, QUICK_REQUESTS) if args.quick else (16, FULL_REQUESTS)
    model = make_model(dim, args.seed)
    prompts = [(r, torch.randn(n, dim), k) for r, n, k in specs]
    paged, after_prefill = run(model, prompts, lambda: PagedKVCache(args.block_size))
    print(f"block_size {args.block_size}; prompt_len/max_new: " + ", ".join(f"{r} {n}/{k}" for r, n, k in specs))
    worst = 0.0  # per request: paged attention (through the block table) vs dense attention over get_kv()
    for req in paged:
        cache = req.kv_cache
        assert isinstance(cache, PagedKVCache) and cache.pool is not None
        print(f"\n{req.req_id} after prefill | {after_prefill[req.req_id]}")
        print(f"{req.req_id} after decode  | {describe(cache)}")
        q, (k, v) = torch.randn(1, dim), cache.get_kv()  # get_kv() gathers the blocks into [len, D] copies
        out_paged, _ = paged_attention(q, cache.pool.key_cache, cache.pool.value_cache,
                                       torch.tensor([cache.block_table]), torch.tensor([len(cache)]))
        worst = max(worst, (out_paged - scaled_dot_product_attention(q, k, v)[0]).abs().max().item())
    dense, _ = run(model, prompts, DenseKVCache)
    tokens = max((torch.stack(p.generated_tokens) - torch.stack(d.generated_tokens)).abs().max().item()
                 for p, d in zip(paged, dense))
    oracle = oracle_error(model, paged)
    print(f"\npaged_attention vs dense attention over get_kv(): {fmt_diff(worst, 'paged - dense')}")
    print(f"tokens with paged caches vs dense caches:         {fmt_diff(tokens, 'paged - dense')}")
    print(f"paged run vs the oracle:                          {fmt_diff(oracle)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
