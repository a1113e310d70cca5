"""Static vs continuous batching: the same requests and slots, several times the tokens per step.

Static batching takes ``--slots`` requests, runs them until the LAST one is done, then takes
the next batch; a finished request keeps its slot as padding. Continuous batching refills a
slot the step it frees. Chat answers are long-tailed (most short, a few very long), so a static
batch mostly waits for its one long answer: the ratio is the batch's longest output over the
mean output. Steps, tokens per step and latencies (in steps) are the same on every machine;
tokens/s is this machine's clock and moves with its load. The model is dim 16, so the demo runs
on one torch thread (a second one only waits for a busy neighbour core).

Try: ``--slots 4`` (short batches: a smaller gap) or ``--slots 64`` (a wider one).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from cb_lab import viz
from cb_lab.monitoring.trace import StepTrace
from cb_lab.serving import HEADLINE_WORKLOAD, QUICK_WORKLOAD, batch_stats, make_config, ratios, simulate
from cb_lab.workload import generate_workload
from demos._common import demo_parser


def small_timeline(steps: list[StepTrace], num_steps: int, first: int, count: int) -> str:
    """Rows ``first .. first + count - 1`` (in arrival order) of the first ``num_steps`` steps, under the ruler."""
    lines = viz.timeline(steps[:num_steps]).splitlines()  # a legend, two ruler lines, one row per request
    return "\n".join(lines[1:3] + lines[3 + first : 3 + first + count])


def main(argv: list[str] | None = None) -> int:
    parser = demo_parser(__doc__)
    parser.add_argument("--slots", type=int, default=16, help="max_num_seqs: the batch size of both (default 16)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(args.slots, args.quick, args.seed)
    finally:
        torch.set_num_threads(threads)  # a caller in this process keeps its own


def run(slots: int, quick: bool, seed: int) -> int:
    workload = replace(QUICK_WORKLOAD if quick else HEADLINE_WORKLOAD, seed=seed)
    specs = generate_workload(workload)
    engine = {"max_num_seqs": slots, "max_tokens_per_step": 32 * slots}  # a whole batch fits one step
    static, continuous = (simulate(specs, make_config(name, **engine), name=name, seed=seed)
                          for name in ("static", "continuous"))
    outputs = [s.max_new_tokens for s in specs]
    print(f"{len(specs)} requests at step 0, outputs {workload.output_lens.kind} (median {workload.output_lens.a:g}, "
          f"at most {workload.output_lens.maximum}): mean {sum(outputs) / len(outputs):.1f}, longest {max(outputs)}")
    print(f"both: {slots} slots (max_num_seqs), budget {engine['max_tokens_per_step']} tokens/step\n")
    print(f"{'':<11} {'steps':>6} {'tokens/step':>11} {'p99 TTFT (steps)':>16} {'padding':>8} {'tokens/s*':>10}")
    for result in (static, continuous):
        s = result.summary
        print(f"{result.name:<11} {s['steps']:>6} {s['tokens_per_step']:>11.2f} {s['ttft_p99_steps']:>16.0f} "
              f"{s['padding_tokens']:>8} {s['tokens_per_s']:>10,.0f}")
    r = ratios(continuous.summary, static.summary)
    print(f"continuous / static: {r['tokens_per_step']:.2f}x tokens/step, {r['ttft_p99_steps']:.2f}x p99 TTFT "
          f"(counted in steps: the same on every machine)")
    print(f"* tokens/s: {r['tokens_per_s']:.2f}x on this machine's clock, which moves with its load\n")

    out = {s.req_id: s.max_new_tokens for s in specs}
    print("why: a static batch decodes until its longest answer is done")
    for i, batch in enumerate([s.admitted for s in static.steps if s.admitted][:4]):
        lengths = [out[req_id] for req_id in batch]
        print(f"  batch {i}: {len(batch)} requests, outputs mean {sum(lengths) / len(lengths):5.1f}, "
              f"longest {max(lengths):3d}: slots busy {sum(lengths) / (len(lengths) * max(lengths)):.0%}")
    b = batch_stats(static)
    print(f"  all {b['batches']:.0f} batches: mean output {b['mean_output']:.1f}, mean longest {b['mean_longest']:.1f}"
          f" -> continuous can reach {b['mean_longest']:.1f} / {b['mean_output']:.1f} = {b['bound']:.2f}x "
          f"(measured {r['tokens_per_step']:.2f}x: it still waits for its own longest answer at the end)\n")
    first = max(slots - 4, 0)  # the end of the first batch and the start of the next
    for result in (static, continuous):
        print(f"{result.name}: requests {first}-{first + 11} in the first 72 steps (P prefill, D decode, . waiting)")
        print(small_timeline(result.steps, 72, first, 12) + "\n")
    worst = max(static.oracle_error(), continuous.oracle_error())
    print(f"oracle: max |batched - naive recompute| = {worst:.1e} over both runs (the same tokens, another schedule)")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
