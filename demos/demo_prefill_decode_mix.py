"""Phase 3: prefill and decode in the same step, under a token budget.

Each step the scheduler spends ``max_tokens_per_step`` tokens: first one decode token for
every request that has finished its prompt, then prompt chunks (at most
``prefill_chunk_size`` rows each) in arrival order until the budget is used up. A request
leaves the batch in the step it gets its last token, and its slot goes to the others.

Look at: per step, who decodes, which prompt rows are prefilled (``c 4:8`` = rows 4..7),
how many of the budget's tokens were used, and who finished. At the end every request
is checked against the oracle: one dense forward over its prompt and its own tokens.
"""

from __future__ import annotations

import torch

from cb_lab.core.scheduler import Scheduler
from cb_lab.model.oracle import oracle_error
from demos._common import demo_parser, fmt_diff, make_model, make_request

# (req_id, prompt_len, max_new_tokens)
QUICK_REQUESTS = [("a", 3, 2), ("b", 6, 3), ("c", 9, 2), ("d", 2, 4)]
FULL_REQUESTS = [("a", 5, 3), ("b", 12, 4), ("c", 7, 2), ("d", 3, 6), ("e", 10, 3), ("f", 4, 5)]


def main(argv: list[str] | None = None) -> int:
    parser = demo_parser(__doc__)
    parser.add_argument("--budget", type=int, default=8, help="max_tokens_per_step")
    parser.add_argument("--chunk", type=int, default=4, help="prefill_chunk_size")
    parser.add_argument("--tanh", action="store_true", help="sample tokens with torch.tanh instead of identity")
    args = parser.parse_args(argv)
    dim, specs = (8, QUICK_REQUESTS) if args.quick else (16, FULL_REQUESTS)
    sampler = torch.tanh if args.tanh else None
    model = make_model(dim, args.seed)
    sched = Scheduler(model, args.budget, args.chunk, sampler=sampler)
    requests = [make_request(r, n, k, dim) for r, n, k in specs]
    for req in requests:
        sched.add_request(req)
    print(f"{len(requests)} requests (prompt_len/max_new: "
          + ", ".join(f"{r} {n}/{k}" for r, n, k in specs) + f"), budget {args.budget}, chunk {args.chunk}\n")

    while sched.active:
        plan = sched.schedule()  # pure: peek at the plan; step() below runs exactly this one
        before = list(sched.active)
        stats = sched.step()
        finished = [r.req_id for r in before if r.finished]
        print(f"step {stats['step_id']} | decode=[{' '.join(r.req_id for r in plan.decode)}] "
              f"prefill=[{', '.join(map(repr, plan.prefill))}] | tokens {stats['total_tokens']}/{args.budget}"
              + (f" | finished: {' '.join(finished)}" if finished else ""))

    print("\noracle check (batched tokens vs one dense forward over prompt + generated):")
    worst = 0.0
    for req in requests:
        diff = oracle_error(model, [req], sampler)
        worst = max(worst, diff)
        print(f"  {req.req_id}: {len(req.generated_tokens)} tokens, {fmt_diff(diff)}")
    print(f"all requests: {fmt_diff(worst)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
