# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Real tokens: a Llama-architecture model behind the same scheduler
#
# Everything so far ran on vector "tokens". Here a byte-level Llama (RMSNorm, RoPE, grouped-query
# attention, SwiGLU) trains for a few seconds on this repository's docs, then `LLMEngine` serves
# text prompts with the same scheduler, block pool and executor. (`python -m demos.demo_real_tokens`
# trains for a minute and writes better sentences.)

# %%
import torch

from cb_lab.engine import EngineConfig, LLMEngine
from cb_lab.model.llama_config import LlamaConfig
from cb_lab.model.tokenizer import ByteTokenizer
from cb_lab.sampling import SamplingParams
from demos.demo_real_tokens import train

config = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
model, losses = train(config, seconds=8.0, seed=0)
print(f"{len(losses)} training steps: loss {losses[0]:.2f} -> {sum(losses[-20:]) / 20:.2f} (bytes: ln 256 = 5.55)")

# %% [markdown]
# Four prompts, greedy, 24 tokens each. After seconds of training, expect fragments of the docs'
# words and markdown, not sentences: what matters here is how the tokens are scheduled.

# %%
engine = LLMEngine(model, ByteTokenizer(), EngineConfig(max_num_seqs=4, block_size=8, num_blocks=64))
greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
outputs = engine.generate(["The scheduler", "A KV cache", "Each step", "The block pool"], greedy)
for out in outputs:
    print(f"{out.prompt!r:>16} -> {out.text!r}")

# %% [markdown]
# Step by step: two requests added, three engine steps. Look at the scheduler: the prompts are
# token ids now, and every layer's K/V of a token sits in one row of the shared pool, so one block
# table per request serves all layers.

# %%
engine.add_request("Continuous batching", greedy)
engine.add_request("Paged attention", SamplingParams(max_tokens=24, temperature=0.8, top_k=20, seed=1))
for _ in range(3):
    engine.step()
engine.scheduler

# %% [markdown]
# The oracle for tokens: each greedy output equals a plain dense forward over its prompt and the
# tokens so far, one token at a time, with no batching, no cache and no scheduler.

# %%
for out in outputs:
    ids = list(out.prompt_token_ids)
    for token in out.token_ids:
        assert int(model.forward_dense(torch.tensor(ids))[-1].argmax()) == token
        ids.append(token)
print(f"{len(outputs)} greedy outputs, {sum(len(o.token_ids) for o in outputs)} tokens: equal to forward_dense")
