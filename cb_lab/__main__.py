"""``python -m cb_lab``: a mixed workload through the scheduler, step by step.

Half the requests arrive at step 0, the rest one every other step, so prefill chunks
and decode tokens share the budget. It prints one line per step (the budget as a bar:
``D`` decode tokens, ``P`` prefill tokens, ``.`` unused), a metrics summary, and the
oracle check: every generated token against a naive dense recompute.

Two subcommands run the serving simulation instead (``cb_lab/cli.py``, ``cb_lab/serving.py``)::

    python -m cb_lab simulate --policy static        # one policy: a table, a timeline, the batches
    python -m cb_lab compare                         # every policy on one workload, ratios to static
    python -m cb_lab compare --quick --json          # one JSON object; --plot DIR writes PNGs

Their flags: ``python -m cb_lab simulate --help``. ``python -m cb_lab generate "prompt" ...``
runs a Llama-architecture model through ``LLMEngine`` (``cb_lab/cli_generate.py``),
``python -m cb_lab chat`` talks to it (``cb_lab/cli_chat.py``), ``python -m cb_lab serve`` serves it
over an OpenAI-compatible HTTP API (``cb_lab/server/``), and ``python -m cb_lab bench ...`` is
``python -m cb_lab.bench ...`` (``bench serve`` loads any such server). Without a subcommand, the flags below.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import torch

from cb_lab.bench import main as bench_main
from cb_lab.cli import serve
from cb_lab.cli_chat import chat_main
from cb_lab.cli_generate import generate_main
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.model.oracle import oracle_error
from cb_lab.model.tiny_llm import TinyLLM
from cb_lab.plugins.base import PluginManager
from cb_lab.plugins.builtin import CacheCompressionPlugin, LoggingPlugin, MetricsPlugin
from cb_lab.server.cli import serve_main
from cb_lab.workload import random_requests, run_workload


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m cb_lab", description=__doc__.splitlines()[0],
        epilog="subcommands: simulate (one serving policy), compare (several, with ratios to static batching), "
               "generate (text through LLMEngine), chat (talk to the model), serve (an OpenAI-compatible server), "
               "bench (python -m cb_lab.bench); see python -m cb_lab simulate --help",
    )
    p.add_argument("--requests", type=int, default=12, help="number of requests (default 12)")
    p.add_argument("--dim", type=int, default=16, help="model / token dim (default 16)")
    p.add_argument("--budget", type=int, default=8, help="max_tokens_per_step (default 8)")
    p.add_argument("--chunk", type=int, default=4, help="prefill_chunk_size (default 4)")
    p.add_argument("--cache", choices=("dense", "paged", "shared"), default="dense",
                   help="dense buffers, paged with a private pool each, or one shared block pool")
    p.add_argument("--executor", choices=("fused", "split"), default="fused",
                   help="one forward per step (fused) or one per decode token (split)")
    p.add_argument("--block-size", type=int, default=4, help="paged cache block size (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tanh", action="store_true", help="sample tokens with torch.tanh")
    p.add_argument("--compression", type=float, metavar="RATIO",
                   help="also run with CacheCompressionPlugin(RATIO) and report bytes saved and output error")
    p.add_argument("--log-level", choices=("DEBUG", "INFO"), help="log every step through LoggingPlugin")
    p.add_argument("--quick", action="store_true", help="a small workload (6 requests, short prompts)")
    args = p.parse_args(argv)
    if args.quick:
        args.requests = min(args.requests, 6)
    for name in ("requests", "dim", "budget", "chunk", "block_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def run(
    args: argparse.Namespace, plugins: PluginManager
) -> tuple[TinyLLM, list[Request], Scheduler, list[dict[str, Any]]]:
    """Build the model and workload from ``args`` and run it to completion."""
    torch.manual_seed(args.seed)
    model = TinyLLM(args.dim)
    max_prompt, max_output = (12, 6) if args.quick else (24, 16)
    requests = random_requests(
        args.requests, dim=args.dim, prompt_lens=(2, max_prompt), output_lens=(1, max_output),
        cache=args.cache, block_size=args.block_size, seed=args.seed,
    )
    sampler = torch.tanh if args.tanh else None
    scheduler = Scheduler(model, args.budget, args.chunk, sampler=sampler, plugins=plugins, executor=args.executor)
    half = (len(requests) + 1) // 2
    arrivals = [(0 if i < half else 2 * (i - half + 1), req) for i, req in enumerate(requests)]
    return model, requests, scheduler, run_workload(scheduler, arrivals)


def budget_bar(stats: dict[str, Any], budget: int) -> str:
    decode, prefill = int(stats["decode_tokens"]), int(stats["prefill_tokens"])
    return "D" * decode + "P" * prefill + "." * (budget - decode - prefill)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["simulate"], ["compare"]):
        return serve(argv)
    if argv[:1] == ["generate"]:
        return generate_main(argv[1:])
    if argv[:1] == ["chat"]:
        return chat_main(argv[1:])
    if argv[:1] == ["serve"]:
        return serve_main(argv[1:])
    if argv[:1] == ["bench"]:
        return bench_main(argv[1:])
    args = parse_args(argv)
    plugins = PluginManager()
    metrics = MetricsPlugin()
    plugins.register_scheduler_plugin(metrics)
    if args.log_level:
        logging.basicConfig(level=args.log_level, format="%(name)s: %(message)s")
        plugins.register_scheduler_plugin(LoggingPlugin(args.log_level))
    model, requests, scheduler, history = run(args, plugins)

    print(f"cb-lab: {args.requests} requests, dim {args.dim}, {args.cache} caches, "
          f"budget {args.budget} tokens/step, prefill chunks <= {args.chunk}, {args.executor} executor\n")
    print("step  budget" + " " * max(args.budget - 6, 1) + " decode prefill active finished")
    for s in history:
        if s["status"] == "completed":
            print(f"{s['step_id']:4d}  {budget_bar(s, args.budget):<{max(args.budget, 6)}} {s['decode_tokens']:6d} "
                  f"{s['prefill_tokens']:7d} {s['active_requests']:6d} {s['finished_requests']:8d}")
    steps, reqs = metrics.collector.get_step_summary(), metrics.collector.get_request_summary()
    used = steps["total_tokens_processed"] / (args.budget * max(steps["total_steps"], 1))
    print(f"\nsteps: {steps['total_steps']}, tokens: {steps['total_tokens_processed']} "
          f"({steps['total_prefill_tokens']} prefill + {steps['total_decode_tokens']} decode), "
          f"budget used: {used:.0%}, throughput: {steps['tokens_per_second']:,.0f} tokens/s, "
          f"model calls: {scheduler.executor.num_model_calls}")
    print(f"requests: {reqs['completed_requests']} finished, mean latency {reqs['mean_latency_s'] * 1e3:.1f} ms, "
          f"p99 {reqs['p99_latency_s'] * 1e3:.1f} ms")
    error = oracle_error(model, requests, torch.tanh if args.tanh else None)
    print(f"oracle: max |batched - naive recompute| = {error:.1e} over {len(requests)} requests "
          f"({'OK' if error < 1e-4 else 'MISMATCH'})")
    if args.compression is not None:
        report_compression(args, requests)
    return 0 if error < 1e-4 else 1


def report_compression(args: argparse.Namespace, reference: list[Request]) -> None:
    """Re-run the same workload with compressed caches and compare with the uncompressed run."""
    plugins = PluginManager()
    compression = CacheCompressionPlugin(args.compression)
    plugins.register_cache_plugin(compression)
    _, compressed, _, _ = run(args, plugins)
    r = compression.report()
    print(f"compression {args.compression} ({compression.storage_dtype}): stored {r['bytes_stored']:,.0f} of "
          f"{r['bytes_original']:,.0f} K/V bytes (saved {r['bytes_saved']:,.0f}), max K/V error "
          f"{r['max_kv_error']:.1e}, max output error vs uncompressed "
          f"{compression.output_error(reference, compressed):.1e}")


if __name__ == "__main__":
    raise SystemExit(main())
