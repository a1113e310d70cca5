"""The Llama-architecture model through cb-lab's own scheduler: token for token equal to HF transformers.

Greedy generation under many schedules (budgets, chunk sizes, block sizes, fused and split,
dense, paged and shared caches, requests added mid-run, preemption forced) equals HF's
``generate(do_sample=False)`` one prompt at a time and HF's continuous batching
``generate_batch``. Seeded sampling gives a request the same tokens alone or in a crowd.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

from cb_lab.bench.llama import hf_cache_config  # noqa: E402
from cb_lab.core.block_pool import BlockPool  # noqa: E402
from cb_lab.core.kv_cache import BaseKVCache, DenseKVCache, PagedKVCache  # noqa: E402
from cb_lab.core.request import Request  # noqa: E402
from cb_lab.core.scheduler import Scheduler  # noqa: E402
from cb_lab.engine import EngineConfig, LLMEngine  # noqa: E402
from cb_lab.model.checkpoint import load_llama  # noqa: E402
from cb_lab.model.llama_step import LlamaStepModel  # noqa: E402
from cb_lab.sampling import SamplingParams  # noqa: E402

VOCAB, NEW = 97, 10
LENGTHS = [5, 1, 17, 9, 3, 24, 12, 7, 2, 15, 8, 20, 4, 11, 6, 13]  # 16 ragged prompts


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, LlamaStepModel]:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None,
                                   eos_token_id=None, pad_token_id=0)
    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # logits far from uniform: greedy choices are clear
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    folder: Path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(folder)
    model, _ = load_llama(folder)
    return hf, LlamaStepModel(model)


@pytest.fixture(scope="module")
def hf_greedy(hf_and_ours: tuple[Any, LlamaStepModel]) -> list[list[int]]:
    hf, _ = hf_and_ours
    config = transformers.GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = []
    with torch.no_grad():
        for ids in prompts():
            full = hf.generate(torch.tensor([ids]), generation_config=config, attention_mask=torch.ones(1, len(ids)))
            out.append(full[0, len(ids):].tolist())
    return out


def cache_of(kind: str, block_size: int, pool: BlockPool) -> BaseKVCache:
    return {"dense": DenseKVCache, "paged": lambda: PagedKVCache(block_size),
            "shared": lambda: PagedKVCache(block_size, pool=pool)}[kind]()


SCHEDULES = [  # (budget, chunk, block size, executor, cache, added mid-run, preempt_every, pool blocks,
    #             the pool layer-major as LLMEngine makes it, or one layer of whole rows)
    (64, 8, 4, "fused", "shared", False, None, 200, True),
    (7, 3, 3, "fused", "shared", True, None, 200, False),
    (16, 16, 5, "split", "dense", True, None, 0, False),
    (9, 4, 2, "fused", "paged", False, 3, 0, False),
    (12, 5, 4, "split", "shared", True, 4, 200, True),
    (20, 6, 4, "fused", "shared", False, None, 40, True),  # a pool too small for everyone: preemptions
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=[f"{s[3]}-{s[4]}-b{s[0]}c{s[1]}" for s in SCHEDULES])
def test_greedy_tokens_equal_hf_generate_under_any_schedule(
    schedule: tuple[Any, ...], hf_and_ours: tuple[Any, LlamaStepModel], hf_greedy: list[list[int]]
) -> None:
    budget, chunk, block_size, executor, kind, mid_run, preempt_every, blocks, layer_major = schedule
    _, model = hf_and_ours
    layers = model.model.config.n_layers if layer_major else 1
    pool = BlockPool(max(blocks, 1), block_size, model.kv_dim, num_layers=layers)
    sched = Scheduler(model, budget, chunk, executor=executor, preempt_every=preempt_every)
    reqs = [Request(f"p{i}", torch.tensor(ids), NEW, cache_of(kind, block_size, pool))
            for i, ids in enumerate(prompts())]
    pending = list(reqs)
    for req in pending[: 6 if mid_run else len(pending)]:
        sched.add_request(req)
    pending = pending[6 if mid_run else len(pending):]
    while sched.active or pending:
        if pending and sched.step_id % 2 == 1:
            sched.add_request(pending.pop(0))  # arrivals while others run
        sched.step()
    for req, want in zip(reqs, hf_greedy):
        assert [int(t) for t in req.generated_tokens] == want, req.req_id
        assert req.finish_reason == "length"
    if preempt_every or blocks == 40:
        assert sched.num_preemptions > 0
    assert pool.num_used_blocks == 0


def test_greedy_tokens_equal_hf_continuous_batching(hf_and_ours: tuple[Any, LlamaStepModel],
                                                    hf_greedy: list[list[int]]) -> None:
    hf, _ = hf_and_ours
    config = transformers.GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    cache = hf_cache_config(prompts(), NEW)  # not 60% of the machine's free memory
    with torch.no_grad():  # HF's continuous batching runs under no_grad, not inference_mode
        out = hf.generate_batch(prompts(), generation_config=config, continuous_batching_config=cache,
                                progress_bar=False, warmup=False)
    batched = [out[f"req_{i}"].generated_tokens for i in range(len(LENGTHS))]
    assert batched == hf_greedy


def run_alone_and_together(model: LlamaStepModel, params: list[SamplingParams]) -> tuple[list[Any], list[Any]]:
    def run(reqs: list[Request], budget: int, chunk: int) -> None:
        sched = Scheduler(model, budget, chunk)
        for r in reqs:
            sched.add_request(r)
        sched.run_until_complete()

    def make() -> list[Request]:
        return [Request(f"s{i}", torch.tensor(ids), NEW, DenseKVCache(), sampling=p)
                for i, (ids, p) in enumerate(zip(prompts(), params))]

    alone = make()
    for r in alone:
        run([r], 64, 64)
    crowd = make()
    run(crowd, 11, 3)
    return [[int(t) for t in r.generated_tokens] for r in alone], [[int(t) for t in r.generated_tokens] for r in crowd]


def test_seeded_sampling_is_the_same_alone_or_in_a_crowd(hf_and_ours: tuple[Any, LlamaStepModel],
                                                         hf_greedy: list[list[int]]) -> None:
    _, model = hf_and_ours
    params = [SamplingParams(max_tokens=NEW, temperature=0.9, top_k=30, top_p=0.95, seed=100 + i)
              for i in range(len(LENGTHS))]
    alone, crowd = run_alone_and_together(model, params)
    assert alone == crowd
    assert alone != hf_greedy, "sampling at temperature 0.9 is not greedy"
    other = [SamplingParams(max_tokens=NEW, temperature=0.9, top_k=30, top_p=0.95, seed=200 + i)
             for i in range(len(LENGTHS))]
    assert run_alone_and_together(model, other)[0] != alone, "another seed, other tokens"


def test_a_request_stops_at_eos_and_gives_its_blocks_back(hf_and_ours: tuple[Any, LlamaStepModel],
                                                          hf_greedy: list[list[int]]) -> None:
    _, model = hf_and_ours
    pool = BlockPool(64, 4, model.kv_dim)
    ids, want = prompts()[2], hf_greedy[2]
    eos = want[3]
    stop_at = want.index(eos)  # the first time the greedy run makes that id
    req = Request("e", torch.tensor(ids), NEW, PagedKVCache(4, pool=pool), eos_token_id=eos)
    ignore = Request("i", torch.tensor(ids), NEW, PagedKVCache(4, pool=pool), eos_token_id=eos,
                     sampling=SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True))
    stop_ids = Request("s", torch.tensor(ids), NEW, PagedKVCache(4, pool=pool),
                       sampling=SamplingParams(max_tokens=NEW, temperature=0.0, stop_token_ids=(want[1],)))
    sched = Scheduler(model, 32, 8)
    for r in (req, ignore, stop_ids):
        sched.add_request(r)
    sched.run_until_complete()
    assert [int(t) for t in req.generated_tokens] == want[: stop_at + 1] and req.finish_reason == "stop"
    assert [int(t) for t in ignore.generated_tokens] == want and ignore.finish_reason == "length"
    assert [int(t) for t in stop_ids.generated_tokens] == want[: want.index(want[1]) + 1]
    assert pool.num_used_blocks == 0


def test_logprobs_equal_hf_log_softmax_under_chunks_prefix_hits_and_penalties(
        hf_and_ours: tuple[Any, LlamaStepModel]) -> None:
    hf, ours = hf_and_ours
    engine = LLMEngine(ours.model, config=EngineConfig(block_size=4, num_blocks=200, max_tokens_per_step=16,
                                                        prefill_chunk_size=5, max_num_seqs=6))
    assert engine.tokenizer is None  # 97 ids: token-id prompts, numbers out
    batch = prompts()[:8]
    params = [SamplingParams(max_tokens=NEW, temperature=0.0, logprobs=4, prompt_logprobs=3),
              SamplingParams(max_tokens=NEW, temperature=0.8, seed=7, logprobs=2, prompt_logprobs=1,
                             repetition_penalty=1.3, frequency_penalty=0.5, n=2)]
    for _ in range(2):  # the second round finds the first's blocks cached: the rows of prompt logprobs run anyway
        asked = [params[i % 2] for i in range(len(batch))]
        for out, p in zip(engine.generate(batch, asked, progress=False), asked):
            ids = out.prompt_token_ids
            for c in out.outputs:
                with torch.no_grad():
                    want = hf(torch.tensor([ids + c.token_ids[:-1]])).logits[0].log_softmax(-1)  # [L + NEW - 1, V]
                k = p.logprobs or 0
                assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
                for row, token, entry in zip(want[len(ids) - 1 :], c.token_ids, c.logprobs):  # the token, the k best
                    assert list(entry)[0] == token and set(entry) == {token, *row.topk(k).indices.tolist()}
                    torch.testing.assert_close(torch.tensor([e.logprob for e in entry.values()]), row[list(entry)],
                                               rtol=0, atol=1e-4)
            prompt_lp = out.prompt_logprobs or []
            assert len(prompt_lp) == len(ids) and prompt_lp[0] is None
            got_prompt = [e[ids[p]].logprob for p, e in enumerate(prompt_lp) if e is not None]
            torch.testing.assert_close(torch.tensor(got_prompt), want[torch.arange(len(ids) - 1), ids[1:]],
                                       rtol=0, atol=1e-4)
