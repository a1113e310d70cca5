"""Phase 4: the scheduler over time, with requests arriving while others run.

Continuous batching re-forms the batch every step: a request joins in the step it
arrives and leaves in the step it gets its last token, so the budget keeps being spent
on whoever is there. The timeline has one row per request and one column
per step: ``P`` a prefill chunk, ``D`` a decode token, ``.`` active but left out of this
step (the budget ran out), blank before arrival and after finish. Under it, one line per
step shows how the budget was spent (``D`` decode, ``P`` prefill, ``.`` unused).

Try: ``--budget 4`` (fewer tokens per step: longer waits, fuller steps) or ``--chunk 16``
(bigger chunks, still capped by what is left of the budget: earlier first tokens for some
requests, more skipped ``.`` steps for others).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from demos._common import demo_parser, make_model, make_request


@dataclass(frozen=True, slots=True)
class Arrival:
    req_id: str
    step: int  # the request is added just before this step runs
    prompt_len: int
    max_new_tokens: int


def make_workload(num_requests: int, seed: int) -> list[Arrival]:
    """Random prompt lengths and token budgets; a new request every 0-2 steps."""
    rng = random.Random(seed)
    steps = [0]
    for _ in range(num_requests - 1):
        steps.append(steps[-1] + rng.randint(0, 2))
    return [Arrival(chr(ord("a") + i), s, rng.randint(2, 12), rng.randint(1, 6)) for i, s in enumerate(steps)]


def main(argv: list[str] | None = None) -> int:
    parser = demo_parser(__doc__)
    parser.add_argument("--budget", type=int, default=8, help="max_tokens_per_step")
    parser.add_argument("--chunk", type=int, default=4, help="prefill_chunk_size")
    args = parser.parse_args(argv)
    dim, workload = (8, make_workload(6, args.seed)) if args.quick else (16, make_workload(14, args.seed))
    sched = Scheduler(make_model(dim, args.seed), args.budget, args.chunk)
    requests: dict[str, Request] = {}
    cells: dict[str, list[str]] = {a.req_id: [] for a in workload}
    spent: list[tuple[int, int]] = []  # (decode, prefill) tokens per step
    first_token: dict[str, int] = {}
    t = 0
    while len(requests) < len(workload) or sched.active:
        for a in workload:
            if a.step == t:
                requests[a.req_id] = make_request(a.req_id, a.prompt_len, a.max_new_tokens, dim)
                sched.add_request(requests[a.req_id])
        plan = sched.schedule()  # pure: step() below runs exactly this plan
        running = {r.req_id: "D" for r in plan.decode} | {c.request.req_id: "P" for c in plan.prefill}
        active = {r.req_id for r in sched.active}  # arrived and not finished
        for r, row in cells.items():
            row.append(running.get(r, ".") if r in active else " ")
        sched.step()
        spent.append((plan.num_decode_tokens, plan.num_prefill_tokens))
        first_token |= {r: t for r, q in requests.items() if q.generated_tokens and r not in first_token}
        t += 1

    print(f"{len(workload)} requests, budget {args.budget} tokens/step, prefill chunk {args.chunk}\n")
    if t > 10:
        print(" " * 23 + "| " + "".join(str(s // 10 % 10) if s >= 10 else " " for s in range(t)))
    print("req arrives prompt/new | " + "".join(str(s % 10) for s in range(t)))
    for a in workload:
        print(f"{a.req_id:>3} {a.step:>7} {a.prompt_len:>6}/{a.max_new_tokens:<3} | {''.join(cells[a.req_id])}")
    print("\nbudget per step (D decode, P prefill, . unused):")
    scale = min(1.0, 40 / args.budget)  # one character per token up to a 40-token budget
    for s, (d, p) in enumerate(spent):
        bar = "D" * math.ceil(d * scale) + "P" * math.ceil(p * scale)
        print(f"step {s:>3} | {bar.ljust(round(args.budget * scale), '.')} | {d + p}/{args.budget}")
    util = sum(d + p for d, p in spent) / (len(spent) * args.budget)
    ttft = [first_token[a.req_id] - a.step + 1 for a in workload]
    print(f"\nsteps: {t}, mean budget utilisation: {util:.0%}, "
          f"mean steps to first token: {sum(ttft) / len(ttft):.2f} (counting the arrival step)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
