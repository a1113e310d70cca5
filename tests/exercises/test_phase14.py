"""Checks the phase 14 exercises (docs/learning_materials/phase14_real_model.md) against cb-lab itself.

The checkers need no model file: SmolLM2's shape (``SMOLLM2``) builds an engine on the meta device
(sizes, no numbers), and small random models run the blocks and the prefix cache. One test checks
``SMOLLM2`` against the real model's config where it is installed (``make model``).
"""

from __future__ import annotations

import json
from types import ModuleType

import pytest
import torch
from given import call, check, given

from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.engine import EngineConfig, LLMEngine
from cb_lab.model.gguf import convert_gguf, unpermute_rotary_rows
from cb_lab.model.hf_config import config_from_hf
from cb_lab.model.llama import LlamaModel
from cb_lab.model.llama_config import LlamaConfig
from cb_lab.model.llama_step import LlamaStepModel
from cb_lab.model.registry import DEFAULT_MODEL, default_cache_dir, model_file
from cb_lab.sampling import SamplingParams

PHASE = "phase14"
SMOLLM2 = LlamaConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                      rope_theta=100_000.0, norm_eps=1e-5, max_position=8192, head_dim=64)
SMALL = LlamaConfig(vocab_size=300, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=48)


def smollm2_engine(config: EngineConfig) -> LLMEngine:
    """An engine over SmolLM2's shape on the meta device: the pool is sized, nothing is computed."""
    with torch.device("meta"):
        model = LlamaModel(SMOLLM2)
    return LLMEngine(model, config=config)


def test_smollm2_is_the_real_models_shape() -> None:
    file = model_file(DEFAULT_MODEL)
    if file is None:
        pytest.skip(f"{DEFAULT_MODEL} is not installed: make model")
    folder = convert_gguf(file, default_cache_dir())  # found in the cache once converted
    real = config_from_hf(json.loads((folder / "config.json").read_text()))
    shape = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_size")
    assert [getattr(real, f) for f in shape] == [getattr(SMOLLM2, f) for f in shape]


def test_phase14_kv_bytes(answers: ModuleType) -> None:
    for name, dtype in (("KV_BYTES_PER_TOKEN", "float32"), ("KV_BYTES_PER_TOKEN_BF16", "bfloat16")):
        pool = smollm2_engine(EngineConfig(num_blocks=1, block_size=1, dtype=dtype)).pool
        per_token = pool.key_cache.nbytes + pool.value_cache.nbytes  # one block of one token
        check(given(answers, name) == per_token, f"{name}: count what one token stores (keys AND values, of which "
                                                  f"heads, in how many layers) and the bytes of a {dtype} number")


def blocks_held(prompt_len: int, max_tokens: int, block_size: int) -> int:
    """The blocks a request's cache holds when it has generated all its tokens."""
    model = LlamaStepModel(LlamaModel(SMALL, seed=0))
    sched = Scheduler(model, max_tokens_per_step=64, prefill_chunk_size=64)
    req = Request("r", torch.arange(prompt_len) % SMALL.vocab_size, max_tokens, PagedKVCache(block_size))
    sched.add_request(req)
    sched.run_until_complete()
    return len(req.kv_cache.block_table)  # a private cache keeps its blocks after the request finishes


def test_phase14_blocks(answers: ModuleType) -> None:
    pool = smollm2_engine(EngineConfig()).pool
    check(given(answers, "POOL_BLOCKS_DEFAULT") == pool.num_blocks,
           "POOL_BLOCKS_DEFAULT: 64 MB is 64 * 2**20 bytes; a block holds 16 tokens; round down")
    for name, prompt_len, max_tokens in (("BLOCKS_45_PROMPT_48_TOKENS", 45, 48), ("BLOCKS_40_PROMPT_9_TOKENS", 40, 9)):
        check(given(answers, name) == blocks_held(prompt_len, max_tokens, 16),
               f"{name}: which tokens' K/V does the cache hold at the end? Is the last generated token ever fed back?")


def saved(arrive_together: bool) -> int:
    """Prefill tokens the prefix cache saves: 5 requests, a shared 40-token system prompt + 5 tokens each."""
    engine = LLMEngine(LlamaModel(SMALL, seed=0), config=EngineConfig(block_size=16, num_blocks=64,
                                                                      max_tokens_per_step=256, prefill_chunk_size=64))
    system = [7 + i for i in range(40)]
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for k in range(5):
        engine.add_request(system + [100 + 5 * k + j for j in range(5)], params)
        if not arrive_together:
            engine.step()
    while engine.has_unfinished_requests():
        engine.step()
    tokens = engine.cache_stats()["prefill_tokens_saved"]
    assert isinstance(tokens, int)
    return tokens


def test_phase14_prefix_saving(answers: ModuleType) -> None:
    check(given(answers, "SAVED_ONE_PER_STEP") == saved(arrive_together=False),
           "SAVED_ONE_PER_STEP: which blocks of the system prompt are full? Who computes them, who finds them cached?")
    check(given(answers, "SAVED_ALL_AT_ONCE") == saved(arrive_together=True),
           "SAVED_ALL_AT_ONCE: when is a block cached: when it is planned, or after the step that fills it?")


def test_phase14_rows(answers: ModuleType) -> None:
    for head_dim in (8, 64):
        stored = torch.arange(head_dim)[:, None]  # one head; each stored row holds its own index
        hf_order = unpermute_rotary_rows(stored, n_heads=1)[:, 0].tolist()  # HF row i <- stored row hf_order[i]
        for hf, row in enumerate(hf_order):
            check(call(answers, "hf_row", row, head_dim) == hf,
                   f"hf_row(stored_row, {head_dim}): rows 2j and 2j + 1 are a rotated pair in llama.cpp; which "
                   f"pair is that in HF's order (dims j and j + head_dim / 2)?")
