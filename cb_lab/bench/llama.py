"""``python -m cb_lab.bench llama``: cb-lab's engine against HF transformers on one workload.

One run, one random-weight Llama (by default dim 256, 4 layers, 8 query heads over 4 key/value
heads, the byte tokenizer's 258 ids), the same prompts (64 of 16..128 tokens, seeded) and 64 greedy new tokens
each, four ways, each timed whole and its tokens compared with ours:

- ``cb-lab``: ``LLMEngine`` (one shared block pool, chunked prefill, one fused forward per step);
- ``hf generate_batch``: HF's own continuous batching;
- ``hf padded generate``: the prompts left-padded into one static batch;
- ``hf one at a time``: ``generate`` per prompt.

Then the compute floor (2 x parameters x tokens processed, at this machine's matmul rate measured
in the same run), where cb-lab's step time goes: the projection and MLP matmuls (timed alone
for the same row counts), the rest of the forward (attention and gathers), and the scheduler's
bookkeeping; and one decode step op by op, with every prompt running (``step_profile.py``).
Needs ``transformers`` (a test requirement; the library itself never imports it).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

from cb_lab.bench.common import now, ratio
from cb_lab.bench.fused import device_arg
from cb_lab.bench.step_profile import print_profile, profile_decode_steps
from cb_lab.engine import EngineConfig, LLMEngine
from cb_lab.model.checkpoint import save_llama
from cb_lab.model.llama import LlamaModel
from cb_lab.model.llama_config import LlamaConfig
from cb_lab.model.tokenizer import ByteTokenizer
from cb_lab.sampling import SamplingParams, sample_batch

__all__ = ["add_parser"]


@dataclass(slots=True)
class Row:
    name: str
    seconds: float
    tokens: list[list[int]]
    match: int = 0  # prompts whose tokens equal cb-lab's
    extra: dict[str, float] = field(default_factory=dict)


def hf_twin(model: LlamaModel) -> Any:
    """HF's LlamaForCausalLM with the very same weights (through ``save_llama``'s folder), on its device."""
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        save_llama(copy.deepcopy(model).cpu(), folder)  # a copy: the model stays on its device
        hf = transformers.LlamaForCausalLM.from_pretrained(folder, pad_token_id=0)
    return hf.eval().to(model.device)  # type: ignore[no-untyped-call]


def scaled_model(config: LlamaConfig, seed: int) -> LlamaModel:
    """Random weights far from the init's near-uniform logits, so greedy choices are clear."""
    model, gen = LlamaModel(config, seed=seed), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else noise * p.shape[-1] ** -0.5)
    return model


def run_ours(model: LlamaModel, prompts: list[list[int]], new: int, args: argparse.Namespace) -> tuple[Row, LLMEngine]:
    config = EngineConfig(max_num_seqs=len(prompts), block_size=16, max_tokens_per_step=args.budget,
                          prefill_chunk_size=args.chunk, kv_memory_mb=256.0)
    engine = LLMEngine(model, ByteTokenizer(), config)
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up, untimed
    start = now(model.device)
    outputs = engine.generate(prompts, params)
    return Row("cb-lab", now(model.device) - start, [o.token_ids for o in outputs]), engine


def hf_cache_config(prompts: list[list[int]], new: int) -> Any:
    """HF ``generate_batch``'s KV cache sized for every prompt at once, as cb-lab's pool is: left to
    itself on a CPU it takes 60% of the free memory (14.8 GB on a 24 GB machine), which costs time to
    allocate and can run the machine out of memory."""
    import transformers

    page = transformers.ContinuousBatchingConfig().page_size  # tokens of one block
    blocks = sum(-(-(len(p) + new) // page) for p in prompts)
    return transformers.ContinuousBatchingConfig(num_blocks=blocks + 1)


def run_hf(hf: Any, prompts: list[list[int]], new: int) -> list[Row]:
    import transformers

    device = hf.device

    transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # no EOS on purpose
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
    config = transformers.GenerationConfig(  # type: ignore[no-untyped-call]
        max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    rows = []
    with torch.no_grad():
        cache = hf_cache_config(prompts, new)
        hf.generate_batch(prompts[:2], generation_config=config, continuous_batching_config=cache,
                          progress_bar=False)  # warm-up, untimed
        start = now(device)
        out = hf.generate_batch(prompts, generation_config=config, continuous_batching_config=cache,
                                progress_bar=False, warmup=False)
        rows.append(Row("hf generate_batch", now(device) - start,
                        [out[f"req_{i}"].generated_tokens for i in range(len(prompts))]))
        longest = max(map(len, prompts))
        ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)  # left padding
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
        start = now(device)
        full = hf.generate(ids, attention_mask=mask, generation_config=config)
        rows.append(Row("hf padded generate", now(device) - start, full[:, longest:].tolist()))
        start = now(device)
        one = [hf.generate(torch.tensor([p], device=device), attention_mask=torch.ones(1, len(p), dtype=torch.long,
                           device=device), generation_config=config)[0, len(p):].tolist() for p in prompts]
        rows.append(Row("hf one at a time", now(device) - start, one))
    return rows


def matmul_rate(dim: int, rows: int, device: torch.device | None = None) -> float:
    """FLOP/s of a ``[rows, dim] @ [dim, dim]`` matmul on ``device`` (default the CPU), median of 5."""
    device = device or torch.device("cpu")
    a, w = torch.randn(rows, dim, device=device), torch.randn(dim, dim, device=device)
    times = []
    for _ in range(5):
        start = now(device)
        for _ in range(10):
            a @ w
        times.append((now(device) - start) / 10)
    return 2 * rows * dim * dim / statistics.median(times)


def linear_seconds(model: LlamaModel, rows: int) -> float:
    """Seconds for every weight matrix of the model applied once to ``rows`` rows (median of 3)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(rows, lin.in_features, device=model.device) for lin in linears]
    times = []
    with torch.no_grad():
        for _ in range(3):
            start = now(model.device)
            for lin, x in zip(linears, inputs):
                lin(x)
            times.append(now(model.device) - start)
    return statistics.median(times)


def bench(args: argparse.Namespace, dim: int, layers: int, num_prompts: int, new: int) -> None:
    config = LlamaConfig(vocab_size=258, dim=dim, n_layers=layers, n_heads=8, n_kv_heads=4, ffn_dim=int(dim * 8 / 3),
                         max_position=512, tie_embeddings=False)
    model = scaled_model(config, args.seed).to(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    lo, hi = args.prompt_lens
    prompts = [torch.randint(0, 256, (int(n),), generator=gen).tolist()
               for n in torch.randint(lo, hi + 1, (num_prompts,), generator=gen)]
    ours, engine = run_ours(model, prompts, new, args)
    rows = [ours, *run_hf(hf_twin(model), prompts, new)]
    for row in rows:
        row.match = sum(a == b for a, b in zip(row.tokens, ours.tokens))
    generated = num_prompts * new
    params = sum(p.numel() for p in model.parameters()) - model.embed_tokens.weight.numel()  # matmul weights
    processed = sum(map(len, prompts)) + generated
    rate = matmul_rate(dim, 64, args.device)
    floor = 2 * params * processed / rate
    print(f"dim {dim}, {layers} layers, 8 heads / 4 kv heads, {params / 1e6:.2f} M matmul parameters; {num_prompts} "
          f"prompts of {lo}..{hi} tokens, {new} greedy tokens each; cb-lab budget {args.budget}, chunk {args.chunk}")
    print(f"{'':<20} {'seconds':>8} {'gen tok/s':>10} {'cb-lab speed':>12} {'same tokens':>12}")
    for row in rows:
        print(f"{row.name:<20} {row.seconds:>8.2f} {generated / row.seconds:>10,.0f} "
              f"{ratio(row.seconds, ours.seconds):>11.2f}x {row.match:>6}/{num_prompts}")
    steps = engine.scheduler.step_id
    proj = linear_seconds(model, processed // max(steps, 1)) * steps
    print(f"floor: 2 x {params / 1e6:.2f} M x {processed:,} tokens at {rate / 1e9:.1f} GFLOP/s = {floor:.2f} s; "
          f"cb-lab takes {ratio(ours.seconds, floor):.2f}x the floor")
    print(f"cb-lab's {steps} steps: weight matmuls about {proj:.2f} s ({ratio(proj, ours.seconds):.0%}), the rest "
          f"(attention, gathers, sampling, scheduler bookkeeping) {ours.seconds - proj:.2f} s")
    print_profile(profile_decode_steps(engine, prompts))


def sampling_seconds(rows: int, vocab: int, params: SamplingParams, device: torch.device) -> float:
    """Seconds for ``sample_batch`` of ``rows`` logits rows by ``params`` (median of 5)."""
    # Peaked like a trained model's: at 49,152 ids the 0.9 nucleus holds about 35 of them (a standard normal
    # would spread it over half the vocabulary, the case where top-p alone must sort everything).
    logits = 4 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)).to(device)
    ids, indices = [f"r{i}" for i in range(rows)], [0] * rows
    times = []
    for _ in range(5):
        start = now(device)
        sample_batch(logits, [params] * rows, ids, indices)
        times.append(now(device) - start)
    return statistics.median(times)


def bench_sampling(rows: int, vocab: int, device: torch.device) -> None:
    greedy = sampling_seconds(rows, vocab, SamplingParams(temperature=0.0), device)
    cut = sampling_seconds(rows, vocab, SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=1), device)
    nucleus = sampling_seconds(rows, vocab, SamplingParams(temperature=0.8, top_p=0.9, seed=1), device)
    print(f"sampling {rows} rows of {vocab:,} logits: greedy {greedy * 1e3:.2f} ms, temperature + top-k 50 + "
          f"top-p 0.9 {cut * 1e3:.2f} ms ({ratio(cut, greedy):.1f}x greedy), top-p 0.9 alone {nucleus * 1e3:.2f} ms "
          f"({ratio(nucleus, greedy):.1f}x)")


def llama_main(args: argparse.Namespace) -> int:
    print(f"cb-lab bench llama: torch {torch.__version__}, {torch.get_num_threads()} threads, seed {args.seed}, "
          f"device {args.device}\n")
    for dim, layers, num_prompts, new in args.configs:
        bench(args, dim, layers, num_prompts, new)
    for vocab in (258, 49_152):  # the byte tokenizer's vocabulary, and SmolLM2's
        bench_sampling(args.configs[0][2], vocab, args.device)
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("llama", help="a Llama-architecture model: cb-lab's engine vs HF transformers")
    p.add_argument("--budget", type=int, default=512, help="max_tokens_per_step (default 512)")
    p.add_argument("--chunk", type=int, default=128, help="prefill_chunk_size (default 128)")
    p.add_argument("--prompt-lens", type=int, nargs=2, default=[16, 128], metavar=("LO", "HI"))
    p.add_argument("--device", type=device_arg, default=torch.device("cpu"), help="cpu (default) or cuda")
    p.add_argument("--quick", action="store_true", help="dim 64, 2 layers, 8 prompts, 8 tokens")
    p.set_defaults(main=llama_main, apply_quick=apply_quick, configs=[(256, 4, 64, 64), (768, 6, 32, 32)])


def apply_quick(args: argparse.Namespace) -> None:
    args.configs, args.prompt_lens = [(64, 2, 8, 8)], [4, 16]
