"""``python -m cb_lab.bench [workload|fused|memory|soak|llama|real|prefix|serve|live]``: benchmarks that print tables.

- ``workload`` (what runs without a subcommand, ``workload.py``): a seeded workload to
  completion: steps, wall time, tokens/s, RSS growth.
- ``fused`` (``fused.py``): decode steps, fused vs split executor vs the floor.
- ``memory`` (``memory.py``): KV slots allocated vs used, shared pool vs dense preallocation.
- ``soak`` (``soak.py``): tens of thousands of steps of continuous arrivals: memory, the pool
  and throughput over time.
- ``llama`` (``llama.py``): a Llama-architecture model, cb-lab's engine against HF transformers'
  ``generate_batch``, padded ``generate`` and one-at-a-time ``generate``, and the compute floor.
- ``real`` (``real.py``): SmolLM2-135M-Instruct (``make model``) on 64 chat prompts, natural and
  equal-length answers, against the same HF ways, the floor, and where the step time goes.
- ``prefix`` (``prefix.py``): prefix caching on vs off on a shared system prompt (prefill
  tokens, TTFT, total time), and its cost without a shared prefix.
- ``serve`` (``serve.py``, also ``python -m cb_lab bench serve``): a load generator for any
  OpenAI-compatible server, with ``vllm bench serve``'s figures.
- ``live`` (``live.py``): the live page's redraw time in Chromium with 200 requests in flight.

Every configuration runs in the same process, so compare them as ratios from one run.
``--quick`` shrinks each to a few seconds (tests run that). ``docs/benchmarks.md`` records them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch

from cb_lab.bench import fused, live, llama, memory, prefix, real, serve, soak, workload

__all__ = ["COMMANDS", "main", "parse_args"]

COMMANDS = ("workload", "fused", "memory", "soak", "llama", "real", "prefix", "serve", "live")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cb_lab.bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for command in (workload, fused, memory, soak, llama, real, prefix, serve, live):
        command.add_parser(sub)
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
        args.apply_quick(args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run: Callable[[argparse.Namespace], int] = args.main
    return run(args)
