"""Phase 14 (docs/learning_materials/phase14_real_model.md): your answers.

Check: pytest tests/exercises -k phase14
"""

from __future__ import annotations

# 1. SmolLM2-135M-Instruct: 30 layers, 9 query heads, 3 KV heads, head_dim 64. The bytes its KV cache
#    takes per token in float32 (EngineConfig(dtype="float32")), and in bfloat16.
KV_BYTES_PER_TOKEN: int | None = None
KV_BYTES_PER_TOKEN_BF16: int | None = None

# 2. The blocks of the pool the default EngineConfig() gives SmolLM2 (kv_memory_mb=64, blocks of 16 tokens).
#    Then, blocks of 16: the blocks one request holds at its end with a 45-token prompt and 48 generated tokens;
#    and with a 40-token prompt and 9 generated tokens.
POOL_BLOCKS_DEFAULT: int | None = None
BLOCKS_45_PROMPT_48_TOKENS: int | None = None
BLOCKS_40_PROMPT_9_TOKENS: int | None = None

# 3. Five requests: the same 40-token system prompt, then 5 tokens of their own; blocks of 16, prefix caching on,
#    a budget that fits every prompt. The prefill tokens the prefix cache saves when they arrive one per step,
#    and when all five arrive in the same step.
SAVED_ONE_PER_STEP: int | None = None
SAVED_ALL_AT_ONCE: int | None = None


# 4. llama.cpp stores the rows of Q and K in another order. Row `stored_row` of a head of size `head_dim` in the
#    GGUF file: which row of the same head is it in HF's order (the order cb-lab's apply_rope expects)?
def hf_row(stored_row: int, head_dim: int) -> int:
    raise NotImplementedError
