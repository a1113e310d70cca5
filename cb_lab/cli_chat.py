"""``python -m cb_lab chat``: talk to the model; each answer streams in as it is generated.

::

    python -m cb_lab chat                                  # SmolLM2-135M-Instruct when installed (make model)
    python -m cb_lab chat --system "Answer in one sentence." --max-tokens 128
    printf 'Hi!\\nWhat is a KV cache?\\n' | python -m cb_lab chat   # one line, one turn

Each line you type is a user message. Every turn sends the whole conversation so far through the
chat template again, as a chat server does; the prefix cache finds the blocks of the earlier turns,
so only the new part is prefilled. A turn the engine refuses (a conversation past the model's
context or the KV pool, text that is not valid Unicode) is reported and left out of the
conversation; the chat goes on. End of input (Ctrl-D) ends the chat.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cb_lab.cli_generate import add_model_arguments, build_engine
from cb_lab.engine import LLMEngine
from cb_lab.exceptions import CBLabException
from cb_lab.model.chat import Message
from cb_lab.sampling import SamplingParams

__all__ = ["chat_main", "chat_parser"]


def chat_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cb_lab chat", description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument("--system", help="a system message before the conversation")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per answer at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (the default): greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="at most 8 tokens per answer")
    return p


def chat_main(argv: Sequence[str]) -> int:
    parser = chat_parser()
    args = parser.parse_args(list(argv))
    try:
        engine, model_name = build_engine(args)
        max_tokens = min(args.max_tokens, 8) if args.quick else args.max_tokens
        params = SamplingParams(max_tokens=max_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=args.seed)
    except (CBLabException, FileNotFoundError) as e:  # a bad value or file: a usage error that names it
        parser.error(str(e))
    context = engine.model.model.config.max_position
    if args.max_tokens >= context:
        parser.error(f"--max-tokens {args.max_tokens} leaves no room for a message in the model's context of "
                     f"{context} tokens")
    print(f"chatting with {model_name}; end of input (Ctrl-D) ends the chat", file=sys.stderr)
    messages: list[Message] = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        if line.strip():
            answer = reply(engine, [*messages, {"role": "user", "content": line}], params)
            if answer is not None:
                messages += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]


def reply(engine: LLMEngine, messages: list[Message], params: SamplingParams) -> str | None:
    """Stream the answer to ``messages``; None (and the reason on stderr) when the engine refuses the turn."""
    try:
        prompt = engine.chat_prompts(messages)[0]
        print("assistant> ", end="", flush=True)
        answer = ""
        for _, delta in engine.stream([prompt], params):
            print(delta, end="", flush=True)
            answer += delta
    except CBLabException as e:  # this turn only: the conversation goes on without it
        print(f"\n(not answered: {e})", file=sys.stderr)
        return None
    print()
    return answer
