"""``python -m cb_lab generate``: text (or token ids) in, text out, through ``LLMEngine``.

::

    python -m cb_lab generate "Continuous batching" "KV cache"      # the random-weight default model
    python -m cb_lab generate --model path/to/checkpoint --max-tokens 64 --temperature 0.8 "Hello"
    python -m cb_lab generate --prompts prompts.json --json          # a JSON list of strings or id lists

Without ``--model`` it builds the default ``LlamaConfig`` with seeded random weights and the
byte tokenizer: the text is noise, but every engine path runs. ``--json`` prints one object:
``outputs`` (one per sample, in prompt order: ``request_id``, ``prompt``, ``token_ids``, ``text``,
``finish_reason``, ``ttft_s``), ``tokens_per_s`` for the run and the prefix cache's
``prefill_tokens_saved`` and ``prefix_hit_rate`` (``LLMEngine.cache_stats``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cb_lab.engine import EngineConfig, LLMEngine
from cb_lab.exceptions import CBLabException
from cb_lab.model.llama import LlamaModel
from cb_lab.model.llama_config import LlamaConfig
from cb_lab.sampling import SamplingParams

__all__ = ["generate_main", "generate_parser"]


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cb_lab generate", description=__doc__.splitlines()[0])
    p.add_argument("prompts", nargs="*", help="prompts (text); or give --prompts FILE")
    p.add_argument("--model", metavar="DIR", help="a local checkpoint folder (config.json + *.safetensors)")
    p.add_argument("--prompts", dest="prompts_file", metavar="FILE", help="a JSON list of strings or of token-id lists")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (the default): greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sample j of prompt i draws with seed + i * n + j")
    p.add_argument("--n", type=int, default=1, help="samples per prompt: forks that share its prefill (default 1)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the EOS token")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, help="KV blocks of the pool (default: from a 64 MB budget)")
    p.add_argument("--no-prefix-caching", action="store_true", help="compute every prompt's prefill in full")
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
    return prompts


def generate_main(argv: Sequence[str]) -> int:
    parser = generate_parser()
    args = parser.parse_args(list(argv))
    prompts = load_prompts(args, parser)
    max_tokens = min(args.max_tokens, 8) if args.quick else args.max_tokens
    try:
        config = EngineConfig(max_num_seqs=args.max_num_seqs, block_size=args.block_size, num_blocks=args.num_blocks,
                              enable_prefix_caching=not args.no_prefix_caching)
        engine = (LLMEngine.from_pretrained(args.model, config) if args.model
                  else LLMEngine(LlamaModel(LlamaConfig(), seed=0), config=config))
        params = [SamplingParams(max_tokens=max_tokens, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, seed=args.seed + i * args.n, ignore_eos=args.ignore_eos, n=args.n)
                  for i in range(len(prompts))]
        start = time.perf_counter()
        outputs = engine.generate(prompts, params)
    except (CBLabException, FileNotFoundError) as e:  # a bad value or file: a usage error that names it
        parser.error(str(e))
    wall = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outputs)
    report: dict[str, Any] = {
        "model": args.model or "random LlamaConfig() (seed 0), byte tokenizer",
        "outputs": [{"request_id": o.request_id, "prompt": o.prompt, "token_ids": o.token_ids, "text": o.text,
                     "finish_reason": o.finish_reason, "ttft_s": o.ttft_s} for o in outputs],
        "steps": engine.scheduler.step_id, "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        **engine.cache_stats(),
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for out in report["outputs"]:
        print(f"[{out['request_id']}] {out['prompt']!r}\n    -> {out['text']!r} "
              f"({len(out['token_ids'])} tokens, {out['finish_reason']})")
    print(f"\n{tokens} tokens in {report['steps']} steps, {wall:.2f} s: {report['tokens_per_s']:,.0f} tokens/s "
          f"({report['model']})")
    if report["prefill_tokens_saved"]:
        print(f"prefix cache: {report['prefill_tokens_saved']} prompt tokens not computed again "
              f"({report['prefix_hit_rate']:.0%} of the prompt tokens)")
    return 0
