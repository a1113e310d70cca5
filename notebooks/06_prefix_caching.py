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
# # Prefix caching: shared blocks, LRU eviction, copy-on-write
#
# Chat requests repeat the same system prompt. A full KV block is named by a hash of its rows and
# of every row before it, so a new request whose prompt starts the same way takes the cached blocks
# instead of computing them again. Cached blocks outlive their request (evictable, least recently
# used first), and a fork shares every block until its first write into a shared one copies it.

# %%
import torch
from IPython.display import display

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.model.oracle import oracle_error
from cb_lab.model.tiny_llm import TinyLLM

torch.manual_seed(0)
model = TinyLLM(dim=16)
system = torch.randn(16, 16)  # a 16-row system prompt: 4 full blocks of 4 rows
prompts = [torch.cat([system, torch.randn(3 + i, 16)]) for i in range(6)]


def run(caching: bool) -> tuple[Scheduler, BlockPool, list[Request], list[dict]]:
    """Six requests with the same system prompt, two arriving per step; returns the steps' stats too."""
    pool = BlockPool(num_blocks=64, block_size=4, dim=16)
    sched = Scheduler(model, max_tokens_per_step=32, prefill_chunk_size=32, enable_prefix_caching=caching)
    requests = [Request(f"u{i}", p, 4, PagedKVCache(4, pool=pool)) for i, p in enumerate(prompts)]
    history = []
    for i in range(0, len(requests), 2):
        sched.add_request(requests[i])
        sched.add_request(requests[i + 1])
        history.append(sched.step())
    return sched, pool, requests, history


# %% [markdown]
# With caching on, after three steps. Look at the block tables: the system prompt's blocks are
# **starred** (held by several requests); `u0` and `u1` arrived together, before anything was
# cached, so each computed its own copy. Look at the last step's table: the new requests start
# "after 4 cached blocks".

# %%
sched, pool, requests, history = run(caching=True)
sched

# %% [markdown]
# To the end, caching off vs on: the same tokens (to float rounding), fewer prefill rows computed.

# %%
history += sched.run_until_complete()
plain, _, plain_requests, plain_history = run(caching=False)
plain_history += plain.run_until_complete()
off, on = (sum(s["prefill_tokens"] for s in h) for h in (plain_history, history))
diff = max((torch.stack(a.generated_tokens) - torch.stack(b.generated_tokens)).abs().max().item()
           for a, b in zip(plain_requests, requests))
print(f"prefill rows computed: caching off {off}, on {on} ({sum(s['prefix_hit_tokens'] for s in history)} taken "
      f"from cached blocks)")
print(f"max |on - off| over every token: {diff:.1e}; oracle error with caching on: {oracle_error(model, requests):.1e}")
assert on < off and diff < 1e-5 and oracle_error(model, requests) < 1e-5

# %% [markdown]
# The pool after every request finished: nothing is in use, and the cached blocks (pale) stay,
# evictable, for the next request with the same prefix; an allocation that finds no free block
# evicts the least recently used one.

# %%
pool

# %% [markdown]
# Copy-on-write: `fork` a running request. The fork shares all its blocks, the partial last one
# too (starred); the first write into that block copies it, once, and the parent's rows never
# change.

# %%
pool = BlockPool(num_blocks=16, block_size=4, dim=16)
sched = Scheduler(model, max_tokens_per_step=32, prefill_chunk_size=32, enable_prefix_caching=True)
parent = Request("p", torch.randn(10, 16), 4, PagedKVCache(4, pool=pool))
sched.add_request(parent)
sched.step()  # the whole prompt: 10 rows in blocks of 4, the last one partial
child = sched.fork("p", "p.fork")
display(parent.kv_cache, child.kv_cache)

# %%
before = parent.kv_cache.get_kv()[0].clone()
sched.step()
print(f"copies made: {pool.num_copies}; parent's rows unchanged: {torch.equal(parent.kv_cache.get_kv()[0][:10], before[:10])}")
sched
