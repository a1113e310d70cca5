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
# # A 10-minute tour of cb-lab
#
# Continuous batching in three moves: **one request**, then **a ragged batch** of several, then
# **the scheduler**, step by step. Every object shows itself when it is the last line of a cell;
# read what it shows before you run the next cell. (`print(obj)` gives the plain-text version.)

# %%
import torch
from IPython.display import display

from cb_lab.core.batch_builder import build_ragged_batch
from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.model.oracle import oracle_error
from cb_lab.model.tiny_llm import TinyLLM

torch.manual_seed(0)
model = TinyLLM(dim=16)  # one attention layer on 16-dim vector "tokens": small enough to check by hand

# %% [markdown]
# ## 1. One request
# A request is a prompt (`[6, 16]`: six vector tokens), a token budget (3 new tokens) and a KV cache.
# Look at: **phase** `prefill` (no prompt row has been run yet), both progress bars empty,
# `cache_len 0`.

# %%
pool = BlockPool(num_blocks=16, block_size=4, dim=16)  # one pool of 4-row blocks that every request shares
req = Request("alice", torch.randn(6, 16), 3, PagedKVCache(block_size=4, pool=pool))
req

# %% [markdown]
# ## 2. A ragged batch
# Two requests' chunks laid end to end: 3 rows of `a` (positions 0..2) and 2 rows of `b` that
# continue a prompt at position 5. No padding: the **mask** keeps them apart. Look at: each row
# attends only to its own request's rows at its position or before (the coloured `x` cells); a
# `b` row never sees an `a` row.

# %%
build_ragged_batch([("a", 0, torch.randn(3, 16)), ("b", 5, torch.randn(2, 16))])

# %% [markdown]
# ## 3. The scheduler, step by step
# Three requests, a budget of 8 tokens per step, prompt chunks of at most 4 rows. Before the first
# step, all three wait.

# %%
scheduler = Scheduler(model, max_tokens_per_step=8, prefill_chunk_size=4)
requests = [req] + [Request(name, torch.randn(n, 16), 3, PagedKVCache(block_size=4, pool=pool))
                    for name, n in (("bob", 9), ("carol", 3))]
for r in requests:
    scheduler.add_request(r)
scheduler

# %% [markdown]
# One step. What `step()` returns is a dict of figures; shown, it also lists **which request got
# which tokens and why** the others wait (here: the budget is spent).

# %%
scheduler.step()

# %% [markdown]
# A second step: `carol` joins with the 2 tokens left in the budget. Look at the scheduler: `alice`
# has run her whole prompt, so she now **decodes**; `bob` and `carol` still **prefill**. Their
# block tables hold the pool's blocks side by side (`alice [0, 2]`, `bob [1, 3]`, ...).

# %%
scheduler.step()
scheduler

# %% [markdown]
# The third step mixes the two kinds of work: `alice` decodes one token while `bob` and `carol`
# run the last rows of their prompts (and so get their first tokens).

# %%
scheduler.step()

# %% [markdown]
# Run to the end, and check every token against the oracle: a naive dense recompute of each
# request alone. The batched result must equal it (up to float rounding).

# %%
scheduler.run_until_complete()
display(requests[1], pool)
print(f"max |batched - naive| = {oracle_error(model, requests):.1e}")
assert oracle_error(model, requests) < 1e-5
