"""Checks the phase 13 exercises (docs/learning_materials/phase13_prefix_caching.md) against cb-lab itself."""

from __future__ import annotations

from types import ModuleType

import torch
from given import check, given
from helpers import make_model

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.model.llama import LlamaModel
from cb_lab.model.llama_config import LlamaConfig
from cb_lab.model.llama_step import LlamaStepModel
from cb_lab.sampling import SamplingParams
from demos import demo_prefix_caching

PHASE = "phase13"
D, BS = 8, 4


def rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def hit_rows(sched: Scheduler, pool: BlockPool, prompts: dict[str, torch.Tensor]) -> dict[str, int]:
    """Add the prompts at once; the rows each admission starts after (its prefix-cache hit)."""
    for req_id, prompt in prompts.items():
        sched.add_request(Request(req_id, prompt, 1, PagedKVCache(BS, pool=pool)))
    plan = sched.schedule()
    sched.run_until_complete()
    return {c.request.req_id: c.start for c in plan.prefill}


def test_phase13_hits(answers: ModuleType) -> None:
    pool = BlockPool(32, BS, D)
    sched = Scheduler(make_model(D), max_tokens_per_step=64, prefill_chunk_size=64, enable_prefix_caching=True)
    p = rows(14, 0)
    hit_rows(sched, pool, {"a": p})
    got = hit_rows(sched, pool, {"b": torch.cat([p[:10], rows(3, 1)]), "c": p.clone(), "d": p[:12].clone()})
    check({k: int(v) for k, v in given(answers, "HIT_ROWS").items()} == got,
          "HIT_ROWS: only full blocks of 4 rows are cached, a hit is a chain of them from the first, and the "
          "block holding a prompt's last row is always computed")


def test_phase13_samples(answers: ModuleType) -> None:
    model = LlamaStepModel(LlamaModel(LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                                  ffn_dim=48), seed=0))
    counts = {}
    for prompt_len in (10, 9):
        sched = Scheduler(model, max_tokens_per_step=64, prefill_chunk_size=64)
        params = SamplingParams(max_tokens=3, temperature=1.0, seed=0, n=3)
        prompt = torch.arange(prompt_len) % 64
        sched.add_request(Request("q", prompt, 3, PagedKVCache(BS, pool=BlockPool(32, BS, model.kv_dim)),
                                  sampling=params))
        steps = sched.run_until_complete()
        counts[prompt_len] = (sum(s["prefill_tokens"] for s in steps), sum(s["kv_copies"] for s in steps))
    check(given(answers, "PREFILL_ROWS_N3") == counts[10][0],
          "PREFILL_ROWS_N3: the prompt runs once; what does each fork compute again to draw its own first token?")
    check(given(answers, "COPIES_N3") == counts[10][1],
          "COPIES_N3: a fork's write copies a block only if another table holds it too; where does row 9 land "
          "(blocks of 4)?")
    check(given(answers, "COPIES_N3_9_ROWS") == counts[9][1],
          "COPIES_N3_9_ROWS: with 9 rows, the recomputed last row is row 8: is its block shared, and is it full?")


def test_phase13_eviction(answers: ModuleType) -> None:
    pool = BlockPool(6, BS, D)
    sched = Scheduler(make_model(D), max_tokens_per_step=16, prefill_chunk_size=16, enable_prefix_caching=True)
    a, b = rows(8, 2), rows(8, 3)
    hit_rows(sched, pool, {"a": a})
    hit_rows(sched, pool, {"b": b})
    hit_rows(sched, pool, {"c": rows(16, 4)})
    gone = [name for name, p in (("a", a), ("b", b)) if not pool.lookup(Request(name, p, 1, PagedKVCache(BS))
                                                                         .block_hashes(BS))]
    evicted = gone[0] if len(gone) == 1 else gone
    again = hit_rows(sched, pool, {"a2": a.clone(), "b2": b.clone()})
    check(given(answers, "EVICTED_FIRST") == evicted,
          "EVICTED_FIRST: allocate takes free blocks first, then evicts the least recently used cached block")
    check(given(answers, "HIT_ROWS_A_AGAIN") == again["a2"],
          "HIT_ROWS_A_AGAIN: which of a's blocks are still cached, and is the last prompt row's block ever a hit?")
    check(given(answers, "HIT_ROWS_B_AGAIN") == again["b2"], "HIT_ROWS_B_AGAIN: the same question for b")


def test_phase13_system_len(answers: ModuleType) -> None:
    d = demo_prefix_caching
    model = LlamaStepModel(LlamaModel(LlamaConfig(vocab_size=d.VOCAB, dim=64, n_layers=2, ffn_dim=128), seed=0))
    summary = d.run(model, d.make_prompts(8, 16, 0), True, 256)[1]
    check(given(answers, "SAVED_SYSTEM_LEN_16") == summary["prefill_tokens_saved"],
          "SAVED_SYSTEM_LEN_16: 16 tokens are two full blocks of 8; two requests arrive per step, and a block is "
          "cached only after the step that fills it")
