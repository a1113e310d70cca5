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
# # One shared block pool: block tables, admission, preemption
#
# Every request's K/V lives in fixed-size blocks of ONE pool; a request's **block table** lists its
# blocks. A request is admitted only when the pool has room for its whole prompt, and when a
# running request needs a block the pool does not have, the one that arrived last is **preempted**:
# its blocks go back and it waits to be recomputed. Here the pool is small on purpose.

# %%
import torch

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.model.oracle import oracle_error
from cb_lab.model.tiny_llm import TinyLLM

torch.manual_seed(0)
model = TinyLLM(dim=8)
pool = BlockPool(num_blocks=8, block_size=4, dim=8)  # 8 blocks x 4 rows = 32 K/V rows for everyone
requests = [Request(r, torch.randn(n, 8), k, PagedKVCache(4, pool=pool))
            for r, n, k in (("a", 6, 8), ("b", 5, 8), ("c", 4, 6), ("d", 7, 4))]
sched = Scheduler(model, max_tokens_per_step=8, prefill_chunk_size=4)
for req in requests:
    sched.add_request(req)
pool

# %% [markdown]
# Two steps. Look at the pool: each blue cell is a block in use, and the scheduler's block tables
# say whose it is. Requests that wait say why in the last step's table (`budget`, `no_blocks`).

# %%
sched.step()
sched.step()
sched

# %% [markdown]
# Step until the pool runs out and a request is preempted. Look at the step's table: the preempted
# request's K/V is dropped, and it waits again, ahead of the requests never admitted.

# %%
while sched.active and not sched.step()["preempted_requests"]:
    pass
sched.last_step

# %% [markdown]
# The pool just after the preemption: the victim's blocks are free again (blank) for the others.

# %%
pool

# %% [markdown]
# To the end: the preempted request was recomputed from its prompt and the tokens it had, so every
# request still equals the oracle, and the pool is empty again.

# %%
sched.run_until_complete()
print(f"preemptions: {sched.num_preemptions}; max |batched - naive| = {oracle_error(model, requests):.1e}")
assert sched.num_preemptions > 0 and oracle_error(model, requests) < 1e-5 and pool.num_used_blocks == 0
pool
