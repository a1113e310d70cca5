"""Real tokens: train a small byte-level Llama on these docs, then serve a dozen prompts at once.

Part 1 trains a ``LlamaModel`` (RoPE, grouped-query heads, SwiGLU) on the bytes of
``docs/*.md`` with next-token prediction for about a minute (``--quick``: a few seconds), and
keeps the weights in ``.cache/`` (out of git; the next run loads them). Part 2 serves 12 prompts
through ``LLMEngine``: the same scheduler as TinyLLM's, one shared block pool, chunked prefill,
decode first. Every step prints its batch; every few steps, the texts as they grow.

Look at: the loss falling; steps that mix decode tokens and prefill chunks; prompts that finish
early freeing their slot for a waiting one. Try: ``--temperature 0`` (greedy), or ``--retrain``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cb_lab.core.batch_builder import ragged_causal_mask, ragged_positions
from cb_lab.engine import EngineConfig, LLMEngine
from cb_lab.model.checkpoint import load_llama, save_llama
from cb_lab.model.llama import LlamaModel
from cb_lab.model.llama_config import LlamaConfig
from cb_lab.model.tokenizer import ByteTokenizer
from cb_lab.sampling import SamplingParams
from demos._common import demo_parser

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The scheduler", "A KV cache", "Continuous batching", "Each step", "The prefill", "Paged attention",
           "A request", "The token budget", "Decode", "The block pool", "Preemption", "The oracle"]


def train(config: LlamaConfig, seconds: float, seed: int) -> tuple[LlamaModel, list[float]]:
    """Next-byte prediction on the docs: batches of 8 windows of 64 bytes, kept apart by a ragged mask."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md")))
    data = torch.tensor(list(text.encode("utf-8")))
    model, gen = LlamaModel(config, seed=seed), torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    B, T = 8, 64
    owner, pos = ragged_positions(torch.zeros(B, dtype=torch.long), torch.full((B,), T))  # [B*T]: each from 0
    mask = ragged_causal_mask(owner, pos, owner, pos)  # [B*T, B*T]
    losses, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        starts = torch.randint(0, data.numel() - T - 1, (B,), generator=gen)
        windows = torch.stack([data[s : s + T + 1] for s in starts.tolist()])  # [B, T + 1]
        logits, _, _ = model(windows[:, :-1].reshape(-1), pos, mask)
        loss = torch.nn.functional.cross_entropy(logits, windows[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses


def trained_model(args: argparse.Namespace, config: LlamaConfig, seconds: float, seed: int) -> LlamaModel:
    folder = Path(args.cache_dir) / f"demo_real_tokens_d{config.dim}_s{seconds:g}_seed{seed}"
    if (folder / "config.json").exists() and not args.retrain:
        print(f"loading the trained weights from {folder} (--retrain to train again)")
        return load_llama(folder)[0]
    print(f"training a {sum(p.numel() for p in LlamaModel(config).parameters()):,}-parameter byte-level Llama "
          f"for {seconds:g} s on docs/*.md ...")
    model, losses = train(config, seconds, seed)
    tenth = max(len(losses) // 10, 1)
    means = [sum(losses[i : i + tenth]) / len(losses[i : i + tenth]) for i in range(0, len(losses), tenth)]
    print(f"{len(losses)} steps; loss (mean of each tenth): " + " ".join(f"{m:.2f}" for m in means))
    save_llama(model, folder)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = demo_parser(__doc__)
    parser.add_argument("--temperature", type=float, default=0.7, help="0: greedy (default 0.7, seeded)")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache"), help="where the trained weights are kept")
    parser.add_argument("--retrain", action="store_true", help="train again even if weights are cached")
    args = parser.parse_args(argv)
    config = LlamaConfig(dim=64 if args.quick else 128, n_layers=2, n_heads=4, n_kv_heads=2,
                         ffn_dim=128 if args.quick else 256)
    model = trained_model(args, config, 3.0 if args.quick else 60.0, args.seed)
    engine = LLMEngine(model, ByteTokenizer(), EngineConfig(max_num_seqs=8, block_size=8, num_blocks=128,
                                                            max_tokens_per_step=48, prefill_chunk_size=8))
    for i, prompt in enumerate(PROMPTS):  # different lengths: slots free at different steps
        max_tokens = (8 if args.quick else 24) + 4 * (i % 5)
        engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=args.temperature,
                                                  seed=args.seed + i, stop_token_ids=(ord("\n"),)))
    print(f"\nserving {len(PROMPTS)} prompts, at most 8 at once, budget 48 tokens/step, chunks of 8:")
    texts: dict[str, str] = {}
    while engine.has_unfinished_requests():
        plan = engine.scheduler.schedule()
        for out in engine.step():
            texts[out.request_id] = out.text
        prefill = ", ".join(f"{c.request.req_id} {c.start}:{c.end}" for c in plan.prefill)
        print(f"step {plan.step_id:2d} | decode {len(plan.decode):2d} | prefill [{prefill}]")
        if plan.step_id % 8 == 7 or not engine.has_unfinished_requests():
            for i, prompt in enumerate(PROMPTS):
                print(f"    {prompt!r:<20} -> {texts.get(f'req-{i}', '')!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
