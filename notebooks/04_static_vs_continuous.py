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
# # Static vs continuous batching
#
# The same 48 requests and 8 slots, two policies. **Static** batching takes 8 requests and runs
# them until the LAST one is done; a finished request keeps its slot as padding. **Continuous**
# batching refills a slot the step it frees. Chat answers are long-tailed (most short, a few
# long), so a static batch mostly waits for its one long answer.

# %%
from cb_lab.serving import batch_stats, make_config, ratios, simulate
from cb_lab.workload import LengthDist, WorkloadConfig, generate_workload

workload = WorkloadConfig(48, prompt_lens=LengthDist.uniform(8, 32),
                          output_lens=LengthDist.lognormal(4, 2.0, maximum=48), seed=0)
specs = generate_workload(workload)
engine = {"max_num_seqs": 8, "max_tokens_per_step": 256}  # 8 slots; a whole batch's prompts fit one step
print("outputs:", sorted(s.max_new_tokens for s in specs))

# %% [markdown]
# The static run. Look at the timeline: each batch of 8 starts together and the next waits for
# its longest answer (the long `D` rows); the composition plot shows the **padding** of the
# finished requests' slots.

# %%
static = simulate(specs, make_config("static", **engine), name="static")
static

# %% [markdown]
# The continuous run on the same requests, model and prompts. Look at the timeline: a new request
# starts the step a slot frees, so the steps stay full and the run is much shorter.

# %%
continuous = simulate(specs, make_config("continuous", **engine), name="continuous")
continuous

# %% [markdown]
# The ratios, and the bound the workload alone sets: a static batch runs as long as its longest
# answer, so continuous batching can at best reach (mean longest per batch) / (mean output) times
# the tokens per step. Both runs also match the oracle.

# %%
r = ratios(continuous.summary, static.summary)
b = batch_stats(static)
print(f"continuous / static: {r['tokens_per_step']:.2f}x tokens per step, {r['ttft_p99_steps']:.2f}x p99 TTFT")
print(f"bound from the workload: {b['mean_longest']:.1f} / {b['mean_output']:.1f} = {b['bound']:.2f}x")
print(f"oracle error: static {static.oracle_error():.1e}, continuous {continuous.oracle_error():.1e}")
assert r["tokens_per_step"] > 1 and max(static.oracle_error(), continuous.oracle_error()) < 1e-5
