"""``python -m cb_lab.bench prefix``: prefix caching on vs off, on a shared system prompt.

64 requests (all at once) with a 512-token shared prefix and 32..128-token unique suffixes,
16 greedy tokens each, on a random-weight Llama (dim 256, 4 layers, 8 query heads over 4
key/value heads) and one shared block pool, caching off and on in one run: the prefill tokens
computed, TTFT p50 / p99 (seconds and steps), the total time, and whether the tokens agree.
Then the cost of hashing: the same lengths without a shared prefix, off and on. Each
configuration runs ``--repeats`` times, off and on interleaved in alternating order (a busy
neighbour core slows both alike), and the fastest run counts. Last, the hashing alone, timed
without noise from the model.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from cb_lab.bench.common import ratio
from cb_lab.bench.llama import scaled_model
from cb_lab.core.block_pool import BlockPool, block_hashes
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.model.llama_config import LlamaConfig
from cb_lab.model.llama_step import LlamaStepModel
from cb_lab.monitoring.metrics import MetricsCollector
from cb_lab.plugins.base import PluginManager
from cb_lab.plugins.builtin import MetricsPlugin

__all__ = ["add_parser"]

VOCAB, BLOCK_SIZE = 258, 16


@dataclass(slots=True)
class Run:
    seconds: float
    prefill_tokens: int
    saved: int
    ttft_s: tuple[float, float]  # p50, p99
    ttft_steps: tuple[float, float]
    evictions: int
    tokens: list[list[int]]


def make_prompts(args: argparse.Namespace, shared: bool) -> list[torch.Tensor]:
    """``--requests`` prompts: the shared prefix (or a unique one of the same length) + a unique suffix."""
    gen = torch.Generator().manual_seed(args.seed)
    prefix = torch.randint(0, VOCAB, (args.prefix_len,), generator=gen)
    lo, hi = args.suffix_lens
    prompts = []
    for _ in range(args.requests):
        own = prefix if shared else torch.randint(0, VOCAB, (args.prefix_len,), generator=gen)
        suffix = torch.randint(0, VOCAB, (int(torch.randint(lo, hi + 1, (1,), generator=gen)),), generator=gen)
        prompts.append(torch.cat([own, suffix]))
    return prompts


def run(model: LlamaStepModel, prompts: list[torch.Tensor], caching: bool, args: argparse.Namespace) -> Run:
    rows = sum(p.shape[0] for p in prompts) + len(prompts) * args.new
    pool = BlockPool(rows // BLOCK_SIZE + 2 * len(prompts), BLOCK_SIZE, model.kv_dim,  # room for every request
                     num_layers=model.model.config.n_layers)
    metrics = MetricsPlugin(MetricsCollector(enable_memory_profiling=False))
    plugins = PluginManager()
    plugins.register_scheduler_plugin(metrics)
    sched = Scheduler(model, args.budget, args.chunk, plugins=plugins, max_num_seqs=len(prompts),
                      enable_prefix_caching=caching)
    reqs = [Request(f"r{i}", p, args.new, PagedKVCache(BLOCK_SIZE, pool=pool)) for i, p in enumerate(prompts)]
    start = time.perf_counter()
    for req in reqs:
        sched.add_request(req)
    sched.run_until_complete()
    seconds = time.perf_counter() - start
    s = metrics.get_summary()["run"]
    return Run(seconds, s["prefill_tokens"], s["prefill_tokens_saved"], (s["ttft_p50_s"], s["ttft_p99_s"]),
               (s["ttft_p50_steps"], s["ttft_p99_steps"]), s["kv_evictions"],
               [[int(t) for t in r.generated_tokens] for r in reqs])


def best(model: LlamaStepModel, prompts: list[torch.Tensor], args: argparse.Namespace) -> tuple[Run, Run]:
    """The fastest of ``--repeats`` runs off and on, interleaved, in alternating order (off first, then on first)."""
    runs: dict[bool, list[Run]] = {False: [], True: []}
    for i in range(args.repeats):
        for caching in (False, True) if i % 2 == 0 else (True, False):
            runs[caching].append(run(model, prompts, caching, args))
    return min(runs[False], key=lambda r: r.seconds), min(runs[True], key=lambda r: r.seconds)


def prefix_main(args: argparse.Namespace) -> int:
    config = LlamaConfig(vocab_size=VOCAB, dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=4,
                         ffn_dim=args.dim * 8 // 3, max_position=4096)
    model = LlamaStepModel(scaled_model(config, args.seed))
    lo, hi = args.suffix_lens
    print(f"cb-lab bench prefix: torch {torch.__version__}, {torch.get_num_threads()} threads, seed {args.seed}")
    print(f"dim {args.dim}, {args.layers} layers; {args.requests} requests at once: a {args.prefix_len}-token shared "
          f"prefix + {lo}..{hi} own tokens, {args.new} greedy tokens each; budget {args.budget}, chunk "
          f"{args.chunk}, blocks of {BLOCK_SIZE}\n")
    run(model, make_prompts(args, True)[:2], True, args)  # warm-up, untimed
    off, on = best(model, make_prompts(args, True), args)
    print(f"{'shared prefix':<16} {'prefill tok':>11} {'saved':>7} {'TTFT p50 s':>11} {'TTFT p99 s':>11} "
          f"{'p50 steps':>10} {'p99 steps':>10} {'total s':>8} {'evictions':>10}")
    for name, r in (("caching off", off), ("caching on", on)):
        print(f"{name:<16} {r.prefill_tokens:>11,} {r.saved:>7,} {r.ttft_s[0]:>11.3f} {r.ttft_s[1]:>11.3f} "
              f"{r.ttft_steps[0]:>10.1f} {r.ttft_steps[1]:>10.1f} {r.seconds:>8.2f} {r.evictions:>10}")
    same = sum(a == b for a, b in zip(off.tokens, on.tokens))
    print(f"caching on: {ratio(off.prefill_tokens, on.prefill_tokens):.2f}x fewer prefill tokens, "
          f"{ratio(off.seconds, on.seconds):.2f}x less total time, TTFT p50 {ratio(off.ttft_s[0], on.ttft_s[0]):.2f}x "
          f"and p99 {ratio(off.ttft_s[1], on.ttft_s[1]):.2f}x shorter; same tokens {same}/{len(off.tokens)}")
    plain_off, plain_on = best(model, make_prompts(args, False), args)
    print(f"no shared prefix (best of {args.repeats}): off {plain_off.seconds:.2f} s, on {plain_on.seconds:.2f} s, "
          f"saved {plain_on.saved} tokens: caching on takes {ratio(plain_on.seconds, plain_off.seconds):.3f}x the "
          f"time (hashing and lookups)")
    hashing = hash_seconds(make_prompts(args, False))
    print(f"hashing every prompt's full blocks once: {hashing * 1e3:.2f} ms, {hashing / plain_off.seconds:.2%} of "
          f"the run without caching")
    return 0


def hash_seconds(prompts: list[torch.Tensor]) -> float:
    """The hashing part of the cost alone, free of run-to-run noise: every prompt's block hashes."""
    start = time.perf_counter()
    for prompt in prompts:
        block_hashes(prompt, BLOCK_SIZE)
    return time.perf_counter() - start


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("prefix", help="prefix caching on vs off: a shared system prompt, then no shared prefix")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--suffix-lens", type=int, nargs=2, default=[32, 128], metavar=("LO", "HI"))
    p.add_argument("--new", type=int, default=16, help="greedy tokens per request (default 16)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--budget", type=int, default=512, help="max_tokens_per_step (default 512)")
    p.add_argument("--chunk", type=int, default=128, help="prefill_chunk_size (default 128)")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration, interleaved; the fastest counts")
    p.add_argument("--quick", action="store_true", help="dim 64, 2 layers, 8 requests, a 64-token prefix")
    p.set_defaults(main=prefix_main, apply_quick=apply_quick)


def apply_quick(args: argparse.Namespace) -> None:
    args.requests, args.prefix_len, args.suffix_lens, args.new = 8, 64, [4, 16], 4
    args.dim, args.layers, args.budget, args.chunk = 64, 2, 64, 32
