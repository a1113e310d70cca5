"""Phase 13: prefix caching and copy-on-write: a shared system prompt is prefilled once.

Chat traffic starts every request with the same system prompt. With ``enable_prefix_caching``
each full KV block is registered under a hash of its tokens and of everything before it; a
request admitted later takes the longest chain of cached blocks and prefills only the rest
(at least its last prompt token, so its first token is its own). Cached blocks outlive their
request on an LRU list until a new allocation needs the room.

The same requests run with caching off and on: the prefill tokens computed, TTFT in steps and
the wall time, then the block tables of one step (``*``: a block two or more requests share).
Last, ``SamplingParams(n=4)``: one prompt prefilled once, three forks share its blocks and the
first write into the shared partial block copies it (copy-on-write).

Look at: the prefill tokens, the starred blocks, the copies. Try: ``--system-len 15`` (the
one full block to share) or ``--num-blocks 12`` (a small pool: preemptions and evictions).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.model.llama import LlamaModel
from cb_lab.model.llama_config import LlamaConfig
from cb_lab.model.llama_step import LlamaStepModel
from cb_lab.monitoring.metrics import MetricsCollector
from cb_lab.monitoring.trace import StepTrace, TracePlugin
from cb_lab.plugins.base import PluginManager
from cb_lab.plugins.builtin import MetricsPlugin
from cb_lab.sampling import SamplingParams
from cb_lab.viz import block_tables
from cb_lab.workload import run_workload
from demos._common import demo_parser

VOCAB, BLOCK_SIZE, BUDGET, CHUNK, NEW = 258, 8, 64, 32, 6


def make_prompts(num_requests: int, system_len: int, seed: int) -> list[torch.Tensor]:
    """One system prompt, then 4..12 tokens of each request's own."""
    gen = torch.Generator().manual_seed(seed)
    system = torch.randint(0, VOCAB, (system_len,), generator=gen)
    return [torch.cat([system, torch.randint(0, VOCAB, (int(torch.randint(4, 13, (1,), generator=gen)),),
                                             generator=gen)]) for _ in range(num_requests)]


class Run(NamedTuple):
    requests: list[Request]
    summary: dict[str, float]  # MetricsCollector's run summary
    steps: list[StepTrace]  # the trace
    wall_s: float
    pool: BlockPool


def run(model: LlamaStepModel, prompts: list[torch.Tensor], caching: bool, num_blocks: int) -> Run:
    """Two arrivals per step on one shared pool; the run summary, the trace and the wall time."""
    pool = BlockPool(num_blocks, BLOCK_SIZE, model.kv_dim)
    trace, metrics = TracePlugin(), MetricsPlugin(MetricsCollector(enable_memory_profiling=False))
    plugins = PluginManager()
    plugins.register_scheduler_plugin(trace)
    plugins.register_scheduler_plugin(metrics)
    sched = Scheduler(model, BUDGET, CHUNK, plugins=plugins, enable_prefix_caching=caching)
    reqs = [Request(f"r{i:02d}", p, NEW, PagedKVCache(BLOCK_SIZE, pool=pool)) for i, p in enumerate(prompts)]
    start = time.perf_counter()
    run_workload(sched, [(i // 2, r) for i, r in enumerate(reqs)])
    wall = time.perf_counter() - start
    return Run(reqs, metrics.get_summary()["run"], trace.steps, wall, pool)


def parallel_samples(model: LlamaStepModel, prompt: torch.Tensor, n: int) -> None:
    pool = BlockPool(32, BLOCK_SIZE, model.kv_dim)
    sched = Scheduler(model, BUDGET, CHUNK)
    params = SamplingParams(max_tokens=NEW, temperature=1.0, seed=0, n=n)
    parent = Request("s", prompt, NEW, PagedKVCache(BLOCK_SIZE, pool=pool), sampling=params)
    sched.add_request(parent)
    history = []
    while not parent.generated_tokens:  # the prefill; its last step draws token 0 and forks the other samples
        history.append(sched.step())
    samples = list(sched.running)
    print(f"\nSamplingParams(n={n}) of one {prompt.shape[0]}-token prompt: once it is prefilled, {len(samples) - 1} "
          f"forks share all its blocks, the partial last one too (ref counts in brackets):")
    for req in samples:
        cells = " ".join(f"{b}({pool.ref_counts[b]})" for b in req.kv_cache.block_table)
        print(f"  {req.req_id:<4} {len(req.kv_cache):>3} rows  [{cells}]")
    history += sched.run_until_complete()
    prefill, copies = sum(s["prefill_tokens"] for s in history), sum(s["kv_copies"] for s in history)
    print(f"prefill tokens in all: {prefill} = {prompt.shape[0]} + {n - 1} (each fork recomputes the last prompt "
          f"row to draw its own first token); copy-on-write copies: {copies}")
    for req in samples:
        print(f"  {req.req_id:<4} tokens {[int(t) for t in req.generated_tokens]}")


def main(argv: list[str] | None = None) -> int:
    parser = demo_parser(__doc__)
    parser.add_argument("--system-len", type=int, default=48, help="tokens of the shared system prompt")
    parser.add_argument("--num-blocks", type=int, default=256, help=f"blocks of the shared pool ({BLOCK_SIZE} rows)")
    args = parser.parse_args(argv)
    num_requests = 8 if args.quick else 32
    model = LlamaStepModel(LlamaModel(LlamaConfig(vocab_size=VOCAB, dim=64, n_layers=2, ffn_dim=128), seed=args.seed))
    prompts = make_prompts(num_requests, args.system_len, args.seed)
    print(f"{num_requests} requests: a {args.system_len}-token system prompt + 4..12 tokens each, two arriving per "
          f"step; blocks of {BLOCK_SIZE} tokens, a pool of {args.num_blocks}, budget {BUDGET}, chunk {CHUNK}\n")
    print(f"{'':<12} {'prefill tokens':>15} {'TTFT p50':>9} {'TTFT p99':>9} {'wall s':>7} {'evictions':>10}")
    off, on = (run(model, prompts, caching, args.num_blocks) for caching in (False, True))
    for name, r in (("caching off", off), ("caching on", on)):
        s = r.summary
        print(f"{name:<12} {s['prefill_tokens']:>15,} {s['ttft_p50_steps']:>9.1f} {s['ttft_p99_steps']:>9.1f} "
              f"{r.wall_s:>7.3f} {s['kv_evictions']:>10}")
    same = all([int(t) for t in a.generated_tokens] == [int(t) for t in b.generated_tokens]
               for a, b in zip(off.requests, on.requests))
    saved = on.summary["prefill_tokens_saved"]
    print(f"\nsaved {saved:,} prefill tokens: hit rate {on.summary['prefix_hit_rate']:.0%} of the prompt tokens, "
          f"{on.summary['prefix_block_hit_rate']:.0%} of their full blocks; the same greedy tokens: {same}")
    step = max(on.steps, key=lambda s: len(s.block_tables))  # the step with the most requests running
    print(f"\n{block_tables(step, max_requests=8)}")
    pool = on.pool
    print(f"the pool at the end: {pool.num_used_blocks} blocks in use, {pool.num_evictable_blocks} cached and "
          f"evictable, {pool.num_free_blocks - pool.num_evictable_blocks} free")
    shared_partial = prompts[0] if (prompts[0].shape[0] - 1) % BLOCK_SIZE else prompts[0][:-1]
    parallel_samples(model, shared_partial, 4)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
