"""``python -m cb_lab generate``: text (or token ids) in, text out, through ``LLMEngine``.

::

    python -m cb_lab generate --chat "What is the capital of France?"   # SmolLM2-135M-Instruct, chat-templated
    python -m cb_lab generate --model path/to/checkpoint --max-tokens 64 --temperature 0.8 "Hello"
    python -m cb_lab generate --model random --prompts prompts.json --json   # strings or id lists

``--model`` takes a name (``smollm2-135m-instruct``, the default when ``make model`` has installed
it), a ``.gguf`` file, a checkpoint folder, or ``random``: the default ``LlamaConfig`` with seeded
random weights and the byte tokenizer, whose text is noise but which runs every engine path in a
second. ``--chat`` sends each prompt as a user message (after ``--system``, if given) through the
model's chat template. ``--json`` prints one object:
``outputs`` (one per sample, in prompt order: ``request_id``, ``prompt``, ``token_ids``, ``text``,
``finish_reason``, ``ttft_s``; with ``--n`` the samples of request ``id`` are ``id``, ``id.1`` ...),
``tokens_per_s`` for the run and the prefix cache's ``prefill_tokens_saved`` and ``prefix_hit_rate``
(``LLMEngine.cache_stats``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cb_lab.engine import EngineConfig, LLMEngine
from cb_lab.exceptions import CBLabException
from cb_lab.model.chat import Message
from cb_lab.model.llama import LlamaModel
from cb_lab.model.llama_config import LlamaConfig
from cb_lab.model.registry import DEFAULT_MODEL, MODELS, model_file
from cb_lab.sampling import SamplingParams

__all__ = ["add_model_arguments", "build_engine", "generate_main", "generate_parser"]

RANDOM = "random"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that pick the model and size the engine (``generate``, ``chat``)."""
    p.add_argument("--model", metavar="NAME|PATH", help=f"a model name ({', '.join(MODELS)}), a .gguf file, a "
                   f"checkpoint folder, or '{RANDOM}' (seeded random weights); default {DEFAULT_MODEL} when "
                   f"installed (make model), else {RANDOM}")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-memory-mb", type=float, default=256.0,
                   help="the KV pool's size when --num-blocks is not given (default 256 MB: 5,800 tokens of SmolLM2)")
    p.add_argument("--num-blocks", type=int, help="KV blocks of the pool (default: from --kv-memory-mb)")
    p.add_argument("--no-prefix-caching", action="store_true", help="compute every prompt's prefill in full")


def build_engine(args: argparse.Namespace) -> tuple[LLMEngine, str]:
    """The engine ``args`` asks for, and the model's name for the report. Without ``--model``: the
    default named model if it is installed, else the random-weight model (with a note on stderr)."""
    config = EngineConfig(max_num_seqs=args.max_num_seqs, block_size=args.block_size, num_blocks=args.num_blocks,
                          kv_memory_mb=args.kv_memory_mb, enable_prefix_caching=not args.no_prefix_caching)
    name = args.model
    if name is None:
        name = DEFAULT_MODEL if model_file(DEFAULT_MODEL) is not None else RANDOM
        if name == RANDOM:
            print(f"({DEFAULT_MODEL} is not installed, so this is the random-weight model and its text is noise; "
                  f"install the real one with: {MODELS[DEFAULT_MODEL].install})", file=sys.stderr)
    if name == RANDOM:
        random_model = LlamaModel(LlamaConfig(), seed=0)
        return LLMEngine(random_model, config=config), "random LlamaConfig() (seed 0), byte tokenizer"
    return LLMEngine.from_pretrained(name, config), str(name)


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cb_lab generate", description=__doc__.splitlines()[0])
    p.add_argument("prompts", nargs="*", help="prompts (text); or give --prompts FILE")
    add_model_arguments(p)
    p.add_argument("--chat", action="store_true", help="send each prompt as a user message through the chat template")
    p.add_argument("--system", help="with --chat: a system message before each prompt")
    p.add_argument("--prompts", dest="prompts_file", metavar="FILE", help="a JSON list of strings or of token-id lists")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (the default): greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sample j of prompt i draws with seed + i * n + j")
    p.add_argument("--n", type=int, default=1, help="samples per prompt: forks that share its prefill (default 1)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the EOS token")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quick", action="store_true", help="at most 8 tokens per prompt")
    return p


def load_prompts(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str | list[int]]:
    prompts: list[str | list[int]] = list(args.prompts)
    if args.prompts_file:
        try:
            data = json.loads(Path(args.prompts_file).read_text())
        except (OSError, ValueError) as e:  # missing, unreadable, or not JSON (JSONDecodeError is a ValueError)
            parser.error(f"--prompts {args.prompts_file}: {e}")
        ok = isinstance(data, list) and all(isinstance(p, str) or (isinstance(p, list) and p and all(
            isinstance(i, int) and not isinstance(i, bool) for i in p)) for p in data)
        if not ok:
            parser.error(f"{args.prompts_file} must hold a JSON list of strings or of non-empty lists of token ids")
        prompts += data
    if not prompts:
        parser.error("give prompts, or --prompts FILE")
    if args.chat and not all(isinstance(p, str) for p in prompts):
        parser.error("--chat takes text prompts, not token ids")
    return prompts


def conversation(prompt: str, system: str | None) -> list[Message]:
    """One user message, after the system message if there is one."""
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": prompt}]


def generate_main(argv: Sequence[str]) -> int:
    parser = generate_parser()
    args = parser.parse_args(list(argv))
    prompts = load_prompts(args, parser)
    max_tokens = min(args.max_tokens, 8) if args.quick else args.max_tokens
    if args.system is not None and not args.chat:
        parser.error("--system needs --chat")
    texts = list(prompts)  # as given, before a chat template turns them into ids
    try:
        engine, model_name = build_engine(args)
        if args.chat:
            prompts = [engine.chat_prompts(conversation(p, args.system))[0] for p in prompts]  # type: ignore[arg-type]
        params = [SamplingParams(max_tokens=max_tokens, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, seed=args.seed + i * args.n, ignore_eos=args.ignore_eos, n=args.n)
                  for i in range(len(prompts))]
        start = time.perf_counter()
        outputs = engine.generate(prompts, params)
    except (CBLabException, FileNotFoundError) as e:  # a bad value or file: a usage error that names it
        parser.error(str(e))
    wall = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    report: dict[str, Any] = {
        "model": model_name,
        "outputs": [{"request_id": o.request_id if c.index == 0 else f"{o.request_id}.{c.index}", "prompt": text,
                     "token_ids": c.token_ids, "text": c.text, "finish_reason": c.finish_reason, "ttft_s": o.ttft_s}
                    for o, text in zip(outputs, texts) for c in o.outputs],
        "steps": engine.scheduler.step_id, "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        **engine.cache_stats(),
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for out in report["outputs"]:
        print(f"[{out['request_id']}] {out['prompt']!r}\n    -> {out['text']!r} "
              f"({len(out['token_ids'])} tokens, {out['finish_reason']})")
    print(f"\n{tokens} tokens in {report['steps']} steps, {wall:.2f} s: {report['tokens_per_s']:,.1f} tokens/s "
          f"({report['model']})")
    if report["prefill_tokens_saved"]:
        print(f"prefix cache: {report['prefill_tokens_saved']} prompt tokens not computed again "
              f"({report['prefix_hit_rate']:.0%} of the prompt tokens)")
    return 0
