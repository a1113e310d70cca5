"""``python -m cb_lab simulate | compare``: the serving simulation from the command line.

::

    python -m cb_lab simulate --policy static        # one policy: a table, a timeline, the batches
    python -m cb_lab compare                         # every policy on one workload, ratios to static
    python -m cb_lab compare --quick --json          # one JSON object; --plot DIR writes PNGs

Every flag: ``python -m cb_lab simulate --help``. The workload comes from flags (lengths as
``fixed:N``, ``uniform:LOW:HIGH``, ``lognormal:MEDIAN:SIGMA[:MAX]``, ``pareto:SCALE:ALPHA[:MAX]``)
or from a JSON/CSV file; the engine knobs are shared by every policy, so a comparison differs
only in the schedule. The runs themselves are ``cb_lab.serving``; this module parses, prints
and draws (``cb_lab.viz``).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from cb_lab import viz
from cb_lab.core.executor import EXECUTORS
from cb_lab.exceptions import CBLabException
from cb_lab.live.hub import StepHub
from cb_lab.live.recorder import LiveTracePlugin
from cb_lab.progress import ProgressBar
from cb_lab.serving import (
    DEFAULT_COMPARE,
    HEADLINE_WORKLOAD,
    POLICY_PRESETS,
    QUICK_WORKLOAD,
    RATIO_KEYS,
    RunResult,
    ServingConfig,
    batch_stats,
    check_fits,
    make_config,
    ratios,
    simulate,
    warm_up,
)
from cb_lab.workload import ARRIVALS, LengthDist, WorkloadConfig, generate_workload
from cb_lab.workload_io import RequestSpec, load_workload, save_workload

__all__ = ["format_dist", "parse_dist", "serve", "serving_parser"]

_DIST_ARGS = {"fixed": 1, "uniform": 2, "lognormal": 2, "pareto": 2}
# Up to this model dim the serving CLI runs on one torch thread unless --threads says otherwise: its
# matrices are too small to split, and a second thread makes every step wait for a busy neighbour core.
SMALL_DIM = 256


def parse_dist(text: str) -> LengthDist:
    """``fixed:16``, ``uniform:4:64``, ``lognormal:48:1.0`` or ``pareto:8:1.2``, each with an optional ``:MAX``."""
    kind, *nums = text.split(":")
    if kind not in _DIST_ARGS or len(nums) not in (_DIST_ARGS[kind], _DIST_ARGS[kind] + 1):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a length distribution; write fixed:N, uniform:LOW:HIGH, lognormal:MEDIAN:SIGMA or "
            "pareto:SCALE:ALPHA (the last two may end with :MAX, the longest length; default 4096)")
    try:
        values = [float(x) for x in nums]
        if kind == "fixed":
            return LengthDist.fixed(int(nums[0]))
        if kind == "uniform":
            return LengthDist.uniform(int(nums[0]), int(nums[1]))
        maximum = int(nums[2]) if len(nums) == 3 else 4096
        return LengthDist(kind, values[0], values[1], maximum=maximum)
    except (ValueError, CBLabException) as e:  # ConfigurationError is a ValueError too
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def format_dist(dist: LengthDist) -> str:
    """The inverse of :func:`parse_dist` (what the header prints)."""
    if dist.kind == "fixed":
        return f"fixed:{dist.a:g}"
    if dist.kind == "uniform":
        return f"uniform:{dist.a:g}:{dist.b:g}"
    return f"{dist.kind}:{dist.a:g}:{dist.b:g}:{dist.maximum}"


def _int_at_least(low: int) -> Callable[[str], int]:
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}")
        return value
    return check


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def _policy_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if bad := [n for n in names if n not in POLICY_PRESETS]:
        raise argparse.ArgumentTypeError(
            f"unknown policy {bad[0]!r} in {text!r}; choose from {','.join(POLICY_PRESETS)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} names a policy twice")
    return names


def serving_parser() -> argparse.ArgumentParser:
    positive = _int_at_least(1)
    common = argparse.ArgumentParser(add_help=False)
    w = common.add_argument_group(
        "workload (default: the headline of docs/serving.md; --quick: 128 requests, outputs <= 64)")
    w.add_argument("--requests", type=positive, help="number of requests")
    w.add_argument("--arrival", choices=ARRIVALS, help="all_at_once (default, a batch job) or poisson (users)")
    w.add_argument("--rate", type=_positive_float, help="poisson: mean arrivals per step (default 1.0)")
    w.add_argument("--prompt-dist", type=parse_dist, metavar="DIST", help="prompt lengths, e.g. uniform:8:64 (default)")
    w.add_argument("--output-dist", type=parse_dist, metavar="DIST",
                   help="output lengths, e.g. lognormal:4:2.0:256 (default), fixed:16, pareto:8:1.2:512")
    w.add_argument("--shared-prefixes", type=_int_at_least(1), metavar="N",
                   help="each prompt starts with one of N shared prefixes (a system prompt; see --prefix-len)")
    w.add_argument("--prefix-len", type=_int_at_least(1), default=32, help="rows of each shared prefix (default 32)")
    w.add_argument("--seed", type=_int_at_least(0), default=0, help="workload, prompts and model weights (default 0)")
    w.add_argument("--workload", metavar="FILE", help="load the requests from a .json or .csv file instead")
    w.add_argument("--save-workload", metavar="FILE", help="write the requests to a .json or .csv file")
    d = ServingConfig()
    e = common.add_argument_group("engine (the same for every policy)")
    e.add_argument("--budget", type=positive, default=d.max_tokens_per_step,
                   help="max_tokens_per_step (default %(default)s)")
    e.add_argument("--chunk", type=positive, default=d.prefill_chunk_size,
                   help="prefill_chunk_size (default %(default)s)")
    e.add_argument("--max-num-seqs", type=positive, default=d.max_num_seqs,
                   help="running requests at most = static batching's batch size (default %(default)s)")
    e.add_argument("--num-blocks", type=positive, help="one shared KV pool of this many blocks (default: dense caches)")
    e.add_argument("--block-size", type=positive, default=d.block_size, help="KV block size (default %(default)s)")
    e.add_argument("--dim", type=positive, default=16, help="model / token dim (default %(default)s)")
    e.add_argument("--executor", choices=sorted(EXECUTORS), default=d.executor)
    e.add_argument("--prefix-caching", action="store_true",
                   help="reuse cached full blocks of shared prefixes (with --num-blocks; see --shared-prefixes)")
    e.add_argument("--preempt-every", type=positive, metavar="N",
                   help="force a preemption every N steps (a rare event, to watch recompute stay exact)")
    e.add_argument("--threads", type=positive,
                   help=f"torch.set_num_threads (default: 1 up to --dim {SMALL_DIM}, where a second thread buys "
                        "nothing and makes every step wait on a busy neighbour core; torch's own above it)")
    o = common.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    o.add_argument("--plot", metavar="DIR", help="write PNGs (timeline, batch composition, KV pool) to DIR/POLICY/")
    o.add_argument("--quick", action="store_true", help="a small workload: 128 requests, outputs of at most 64 tokens")
    p = argparse.ArgumentParser(prog="python -m cb_lab", description="The serving simulation: policies on one engine.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("simulate", parents=[common], help="run one policy and draw its steps")
    s.add_argument("--policy", choices=list(POLICY_PRESETS), default="continuous", help="default %(default)s")
    s.add_argument("--trace", metavar="FILE", help="write every step to FILE, a trace the live page replays")
    s.add_argument("--live", action="store_true",
                   help="serve a page on 127.0.0.1 that draws every step as it runs (--quick: check it and stop)")
    s.add_argument("--pace", type=_seconds, default=0.1, help="--live: seconds per step (default %(default)s)")
    s.add_argument("--port", type=_int_at_least(0), default=8001, help="--live: the port (default %(default)s; 0: a "
                   "free one; --quick always takes a free one)")
    c = sub.add_parser("compare", parents=[common], help="run several policies on one workload, ratios to static")
    c.add_argument("--policies", type=_policy_list, default=list(DEFAULT_COMPARE), metavar="A,B,...",
                   help=f"default {','.join(DEFAULT_COMPARE)}")
    return p


def load_specs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[list[RequestSpec], str]:
    """The workload's specs and a line describing it."""
    given = [f"--{n.replace('_', '-')}" for n in ("requests", "arrival", "rate", "prompt_dist", "output_dist",
                                                  "shared_prefixes") if getattr(args, n) is not None]
    try:
        if args.workload is not None:
            if given:
                parser.error(f"--workload {args.workload} replaces {', '.join(given)}; give one or the other")
            specs = load_workload(args.workload)
            about = f"{len(specs)} requests from {args.workload}"
        else:
            if args.rate is not None and args.arrival != "poisson":
                parser.error(f"--rate {args.rate:g} needs --arrival poisson")
            h = QUICK_WORKLOAD if args.quick else HEADLINE_WORKLOAD
            prompts = args.prompt_dist or h.prompt_lens
            if args.shared_prefixes and prompts.kind == "uniform":  # the prefix comes on top of the unique part
                prompts = LengthDist.uniform(int(prompts.a) + args.prefix_len, int(prompts.b) + args.prefix_len)
            elif args.shared_prefixes and prompts.kind == "fixed":
                prompts = LengthDist.fixed(int(prompts.a) + args.prefix_len)
            elif args.shared_prefixes:
                parser.error(f"--shared-prefixes puts the prefix on top of a uniform or fixed --prompt-dist, got "
                             f"{format_dist(prompts)}; give uniform:LOW:HIGH or fixed:N")
            config = WorkloadConfig(
                args.requests or h.num_requests, prompts, args.output_dist or h.output_lens,
                args.arrival or h.arrival, args.rate or 1.0, num_prefixes=args.shared_prefixes or 0,
                prefix_len=args.prefix_len if args.shared_prefixes else 0, seed=args.seed,
            )
            specs = generate_workload(config)
            arrival = config.arrival + (f" (rate {config.rate:g}/step)" if config.arrival == "poisson" else "")
            about = (f"{len(specs)} requests, {arrival}, prompts {format_dist(config.prompt_lens)}, "
                     f"outputs {format_dist(config.output_lens)}, seed {args.seed}")
        if args.save_workload is not None:
            save_workload(specs, args.save_workload)
    except CBLabException as e:  # a bad file or value: a usage error that names it
        parser.error(str(e))
    return specs, about


_COLUMNS = (  # (header, summary key, format)
    ("steps", "steps", "{:,}"), ("tok/step", "tokens_per_step", "{:.2f}"), ("tok/s", "tokens_per_s", "{:,.0f}"),
    ("TTFT p50", "ttft_p50_steps", "{:.0f}"), ("TTFT p99", "ttft_p99_steps", "{:.0f}"),
    ("TPOT p50", "tpot_p50_steps", "{:.2f}"), ("e2e p99", "e2e_p99_steps", "{:.0f}"),
    ("preempt", "preemptions", "{:,}"), ("padding", "padding_tokens", "{:,}"), ("wall s", "wall_s", "{:.2f}"),
)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns right-aligned (the first left-aligned), a rule under the header."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [[str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
             for r in [header, *rows]]
    lines.insert(1, ["-" * w for w in widths])
    return "\n".join("  ".join(line).rstrip() for line in lines)


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def results_table(results: Sequence[RunResult], baseline: RunResult | None) -> str:
    """One row per policy (latencies in steps), then their ratios to ``baseline``."""
    header = ["policy", *(h for h, _, _ in _COLUMNS)]
    text = format_table(header, [[r.name, *(_cell(r.summary[k], f) for _, k, f in _COLUMNS)] for r in results])
    if baseline is not None and len(results) > 1:
        keys = [(h, k) for h, k, _ in _COLUMNS if k in RATIO_KEYS]
        rows = [[r.name, *(_cell(ratios(r.summary, baseline.summary)[k], "{:.2f}x") for _, k in keys)] for r in results]
        text += f"\n\nratio to {baseline.name} (tok/step and tok/s: higher is better; steps and latencies: lower)\n"
        text += format_table(["policy", *(h for h, _ in keys)], rows)
    return text + "\n\n" + WALL_CLOCK_NOTE


WALL_CLOCK_NOTE = ("steps, tok/step and the latencies (in steps) are the same on every machine; tok/s and wall s are "
                   "this machine's clock\nand move with its load (two runs of one schedule can differ 2x on a busy "
                   "machine): compare schedules by tok/step.")


def why_static_loses(static: RunResult, results: Sequence[RunResult]) -> str:
    """The ratio explained from the workload: a static batch runs as long as its longest answer."""
    b = batch_stats(static)
    measured = ", ".join(f"{r.name} {ratios(r.summary, static.summary)['tokens_per_step']:.2f}x"
                         for r in results if r is not static)
    return (
        f"why: static batching ran {b['batches']:.0f} batches of {b['batch_size']:.1f} requests, and a batch decodes "
        f"until its longest answer is done:\n     mean output {b['mean_output']:.1f} tokens, mean longest answer per "
        f"batch {b['mean_longest']:.1f}, so a static slot does useful work {1 / b['bound']:.0%} of the time.\n"
        f"     Continuous batching refills a slot the step it frees: at best {b['mean_longest']:.1f} / "
        f"{b['mean_output']:.1f} = {b['bound']:.2f}x static's tokens per step with the same "
        f"{static.config.max_num_seqs} slots\n     (measured: {measured}; a continuous run still waits for its own "
        "longest answer at the end)."
    )


def serve(argv: Sequence[str]) -> int:
    """``python -m cb_lab simulate|compare ...``; returns 0 when every request matches the oracle.

    It runs on ``--threads`` torch threads (one by default for a small model) and sets torch's
    thread count back when it returns, so a caller in the same process keeps its own.
    """
    parser = serving_parser()
    args = parser.parse_args(list(argv))
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or (1 if args.dim <= SMALL_DIM else threads))
    try:
        return _serve(args, parser)
    finally:
        torch.set_num_threads(threads)


def make_plot_dir(path: str, parser: argparse.ArgumentParser) -> None:
    """Create ``--plot DIR`` before the run, so a folder that cannot be made fails now, not after the run."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--plot {path}: cannot create the folder ({e.strerror}); give a folder you can write to")


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.plot:
        make_plot_dir(args.plot, parser)
    specs, about = load_specs(args, parser)
    names = [args.policy] if args.command == "simulate" else args.policies
    knobs = {"max_tokens_per_step": args.budget, "prefill_chunk_size": args.chunk, "max_num_seqs": args.max_num_seqs,
             "num_blocks": args.num_blocks, "block_size": args.block_size, "executor": args.executor,
             "preempt_every": args.preempt_every, "enable_prefix_caching": args.prefix_caching}
    try:
        configs = {name: make_config(name, **knobs) for name in names}
        for config in configs.values():
            check_fits(specs, config)
    except CBLabException as e:
        parser.error(str(e))
    if args.command == "simulate" and args.live:
        from cb_lab.cli_live import live_main  # uvicorn and FastAPI: imported only to serve

        result = live_main(args, specs, about, *next(iter(configs.items())))
        if result is None:
            return 0
        error = result.oracle_error()
        print("\n" + results_table([result], None))
        verdict = "OK" if error < 1e-4 else "MISMATCH"
        print(f"oracle {result.name}: max |batched - naive recompute| = {error:.1e} ({verdict})")
        return 0 if error < 1e-4 else 1
    warm_up(specs, next(iter(configs.values())), dim=args.dim, seed=args.seed)
    results = []
    hub = StepHub(window=None) if args.command == "simulate" and args.trace else None
    for name, config in configs.items():
        bar = ProgressBar(name, len(specs))
        extra = [LiveTracePlugin(hub, config.max_tokens_per_step)] if hub is not None else []
        results.append(simulate(specs, config, name=name, dim=args.dim, seed=args.seed, progress=bar, plugins=extra))
        bar.close()
    if hub is not None:
        Path(args.trace).write_text(hub.trace_json())
    errors = {r.name: r.oracle_error() for r in results}
    plots: dict[str, list[str]] = {}
    if args.plot:
        plots = {r.name: [str(p) for p in viz.save_pngs(r.steps, Path(args.plot) / r.name)] for r in results}
    baseline = next((r for r in results if r.name == "static"), results[0])
    if args.json:
        print(json.dumps(report(args, about, results, baseline, errors, plots), indent=1))
    else:
        engine = ", ".join(f"{k} {v}" for k, v in knobs.items() if v is not None)
        threads = torch.get_num_threads()
        print(f"cb-lab {args.command}: {about}\nengine: {engine}, dim {args.dim}, {threads} torch "
              f"thread{'s' if threads > 1 else ''}; latencies in steps\n")
        print(results_table(results, baseline if args.command == "compare" else None))
        if args.prefix_caching:
            print("\n" + prefix_cache_lines(results))
        static = next((r for r in results if r.name == "static"), None)
        if args.command == "compare" and static is not None and len(results) > 1:
            print("\n" + why_static_loses(static, results))
        if args.command == "simulate":
            print("\n" + viz.overview(results[0].steps))
        for name, error in errors.items():
            verdict = "OK" if error < 1e-4 else "MISMATCH"
            print(f"oracle {name}: max |batched - naive recompute| = {error:.1e} ({verdict})")
        for name, paths in plots.items():
            print(f"plots {name}: {', '.join(paths) or 'none (matplotlib is not installed)'}")
        if hub is not None:
            print(f"trace: {len(hub.window)} steps in {args.trace}; the live page (simulate --live, or serve) "
                  "replays it: Replay, choose the file")
    return 0 if max(errors.values()) < 1e-4 else 1


def prefix_cache_lines(results: Sequence[RunResult]) -> str:
    """Per policy, what prefix caching saved (``prefill_tokens_saved``, the hit rates) and evicted."""
    lines = []
    for r in results:
        s = r.summary
        rate = "-" if s["prefix_hit_rate"] is None else f"{s['prefix_hit_rate']:.0%}"
        blocks = "-" if s["prefix_block_hit_rate"] is None else f"{s['prefix_block_hit_rate']:.0%}"
        lines.append(f"prefix cache {r.name}: {s['prefill_tokens_saved']:,} prefill tokens saved (hit rate {rate} of "
                     f"the prompt tokens, {blocks} of their full blocks), {s['kv_evictions']} evictions")
    return "\n".join(lines)


def report(args: argparse.Namespace, about: str, results: Sequence[RunResult], baseline: RunResult,
           errors: dict[str, float], plots: dict[str, list[str]]) -> dict[str, Any]:
    """The ``--json`` object: the setup, and per policy its summary (+ ratios to the baseline in compare)."""
    policies = []
    for r in results:
        row: dict[str, Any] = {**r.summary, "oracle_error": errors[r.name], "config": asdict(r.config)}
        if args.command == "compare":
            row[f"ratio_to_{baseline.name}"] = ratios(r.summary, baseline.summary)
        if plots:
            row["plots"] = plots[r.name]
        policies.append(row)
    static = next((r for r in results if r.name == "static"), None)
    return {"command": args.command, "workload": about, "dim": args.dim, "seed": args.seed,
            "baseline": baseline.name if args.command == "compare" else None, "policies": policies,
            "static_batches": batch_stats(static) if static is not None else None}
