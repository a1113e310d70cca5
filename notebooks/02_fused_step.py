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
# # The fused step: one forward per step
#
# A step holds decode tokens and prefill chunks. The **split** executor runs them as one ragged
# prefill forward plus one `forward_decode` call per decode token; the **fused** executor puts
# every row of the step (decode rows, then prefill rows) through ONE forward, so the weights are
# read once per step. Same plan, same tokens: only the number of model calls changes.

# %%
import time

import torch

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.model.tiny_llm import TinyLLM

SPECS = [("a", 6, 4), ("b", 10, 3), ("c", 3, 6), ("d", 7, 5)]  # (request id, prompt rows, new tokens)


def make_run(executor: str, dim: int, copies: int = 1, budget: int = 8) -> tuple[Scheduler, list[Request]]:
    """The same seeded model and prompts (``copies`` of SPECS) on a fresh pool, under one executor."""
    torch.manual_seed(0)
    model = TinyLLM(dim)
    pool = BlockPool(num_blocks=32 * copies, block_size=4, dim=dim)
    sched = Scheduler(model, max_tokens_per_step=budget, prefill_chunk_size=4, executor=executor)
    specs = [(f"{r}{i}" if copies > 1 else r, n, k) for i in range(copies) for r, n, k in SPECS]
    requests = [Request(r, torch.randn(n, dim), k, PagedKVCache(4, pool=pool)) for r, n, k in specs]
    for req in requests:
        sched.add_request(req)
    return sched, requests


# %% [markdown]
# Three steps under the fused executor. Look at the last step's plan: decode rows and prefill
# chunks side by side; under `fused` they are one forward, under `split` one call per decode
# row plus one for the prefill chunks.

# %%
fused, fused_requests = make_run("fused", 16)
for _ in range(3):
    fused.step()
fused.last_step

# %% [markdown]
# Both executors to the end: the tokens agree (to float rounding).

# %%
fused.run_until_complete()
split, split_requests = make_run("split", 16)
split.run_until_complete()
diff = max((torch.stack(a.generated_tokens) - torch.stack(b.generated_tokens)).abs().max().item()
           for a, b in zip(fused_requests, split_requests))
print(f"max |fused - split| over every token: {diff:.1e}")
assert diff < 1e-5

# %% [markdown]
# Where it pays: a wide model (dim 1024) and 32 requests, 16 tokens a step, where reading the
# weights once instead of once per decode row matters. Look at the ratio (this machine, this run;
# `python -m cb_lab.bench fused` measures it properly).

# %%
seconds = {}
for executor in ("split", "fused"):
    sched, _ = make_run(executor, 1024, copies=8, budget=16)
    start = time.perf_counter()
    sched.run_until_complete()
    seconds[executor] = time.perf_counter() - start
print(f"dim 1024: split {seconds['split']:.3f} s, fused {seconds['fused']:.3f} s, "
      f"fused runs at {seconds['split'] / seconds['fused']:.2f}x the speed of split")
fused
