"""The real-token step's fast parts, each against a plain reference: batched sampling, decode attention
over length buckets with the step's own K/V written into the gathered copy, prefill attention chunk by
chunk, and logits only where a token is sampled."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cb_lab.attention.paged_attention import (
    BUCKET_OVERHEAD_BLOCKS,
    GatherWorkspace,
    decode_buckets,
    paged_attention_heads,
)
from cb_lab.core.batch_builder import cached_prefix_mask
from cb_lab.model.llama import LlamaModel
from cb_lab.model.llama_config import LlamaConfig
from cb_lab.model.llama_layers import grouped_attention
from cb_lab.model.llama_step import LlamaStepModel
from cb_lab.model.prefill_chunks import chunked_attention, prefill_chunks
from cb_lab.sampling import NUCLEUS_WINDOW, SamplingParams, sample_batch

V = 50
PARAMS = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=3),
          SamplingParams(temperature=1.3, top_k=5, seed=4), SamplingParams(temperature=1.0, top_p=0.6, seed=5),
          SamplingParams(temperature=0.9, top_k=8, top_p=0.8), SamplingParams(temperature=1e-45)]


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(rows, V, generator=torch.Generator().manual_seed(seed))


def test_a_row_samples_the_same_token_alone_or_in_a_batch() -> None:
    x = logits(len(PARAMS))
    ids = [f"r{i}" for i in range(len(PARAMS))]
    for index in range(20):
        batch = sample_batch(x, PARAMS, ids, [index] * len(PARAMS))
        alone = [int(p.sample(x[i], ids[i], index)) for i, p in enumerate(PARAMS)]
        assert batch.tolist() == alone
        shuffled = sample_batch(x.flip(0), PARAMS[::-1], ids[::-1], [index] * len(PARAMS))
        assert shuffled.flip(0).tolist() == alone  # the neighbours do not matter


def test_greedy_and_tiny_temperatures_take_the_argmax() -> None:
    x = logits(3, seed=1)
    greedy = [SamplingParams(temperature=0.0), SamplingParams(temperature=1e-45), SamplingParams(top_k=1, seed=2)]
    assert sample_batch(x, greedy, ["a", "b", "c"], [0, 0, 0]).tolist() == x.argmax(-1).tolist()


def test_top_k_and_top_p_keep_only_their_ids() -> None:
    x = logits(1, seed=2)[0]
    order = x.argsort(descending=True).tolist()
    probs = torch.softmax(x, -1)[order]
    nucleus = order[: int((probs.cumsum(0) - probs < 0.6).sum())]  # the smallest set reaching 0.6
    drawn_k = {int(SamplingParams(top_k=5, seed=s).sample(x, "r", 0)) for s in range(300)}
    drawn_p = {int(SamplingParams(top_p=0.6, seed=s).sample(x, "r", 0)) for s in range(300)}
    assert drawn_k == set(order[:5]) and drawn_p == set(nucleus)  # every allowed id comes up, no other


def reference_token(x: torch.Tensor, p: SamplingParams, u: float) -> int:
    """The textbook draw over the whole vocabulary in float64: the ids at least as good as the k-th best,
    then the fewest of those (best first) whose probability reaches top_p, then the first id (in id
    order) whose cumulative probability passes ``u``."""
    scores = x.double() / p.temperature
    if 0 < p.top_k < len(x):
        scores = scores.masked_fill(scores < scores.topk(p.top_k).values[-1], -math.inf)
    probs = torch.softmax(scores, -1)
    order = probs.argsort(descending=True, stable=True)
    before = probs[order].cumsum(0) - probs[order]
    last = probs[order][max(int((before < p.top_p).sum()), 1) - 1] if p.top_p < 1 else 0.0
    probs = probs.masked_fill(probs < last, 0.0)
    cdf = probs.cumsum(0)
    return int(torch.searchsorted(cdf, u * cdf[-1]))


@pytest.mark.parametrize("params", [PARAMS, PARAMS[1:3], PARAMS[2:3]], ids=["mixed", "a cut beside none", "top-k"])
def test_draws_equal_a_float64_reference_over_the_whole_vocabulary(params: list[SamplingParams]) -> None:
    x = logits(len(params), seed=4)
    ids = [f"r{i}" for i in range(len(params))]
    for index in range(30):
        got = sample_batch(x, params, ids, [index] * len(params)).tolist()
        for r, p in enumerate(params):
            if p.temperature >= 1e-5:
                u = float(torch.rand(1, generator=p.generator(ids[r], index)))
                assert got[r] == reference_token(x[r], p, u), (r, index)


def test_a_nucleus_inside_or_wider_than_its_window_draws_as_the_reference() -> None:
    vocab = 4 * NUCLEUS_WINDOW
    g = torch.Generator().manual_seed(5)
    peaked, flat = 6 * torch.randn(vocab, generator=g), 0.1 * torch.randn(vocab, generator=g)
    x = torch.stack([peaked, flat, peaked, flat])
    params = [SamplingParams(top_p=0.9, seed=1), SamplingParams(top_p=0.9, seed=2),
              SamplingParams(top_p=0.8, top_k=300, seed=3), SamplingParams(temperature=0.5, seed=4)]
    order = (flat / 1.0).softmax(-1).sort(descending=True).values.cumsum(0)
    assert int((order < 0.9).sum()) > NUCLEUS_WINDOW  # the flat row's nucleus does not fit its window
    ids = ["a", "b", "c", "d"]
    for index in range(25):
        got = sample_batch(x, params, ids, [index] * 4).tolist()
        for r, p in enumerate(params):
            u = float(torch.rand(1, generator=p.generator(ids[r], index)))
            assert got[r] == reference_token(x[r], p, u) == int(p.sample(x[r], ids[r], index)), (r, index)


def test_ids_tied_with_the_last_kept_one_are_kept_alone_or_in_a_batch() -> None:
    x = torch.full((V,), -5.0)
    x[:3] = torch.tensor([4.0, 3.0, 2.0])
    x[10:20] = 1.0  # ten ids tie for 4th place: top_k=4 keeps all of them, as vLLM's top-k does
    row = SamplingParams(top_k=4, seed=0)
    alone = {int(SamplingParams(top_k=4, seed=s).sample(x, "r", 0)) for s in range(400)}
    assert alone == {0, 1, 2, *range(10, 20)}
    wide = SamplingParams(top_k=30, seed=9)  # a neighbour whose cut is wider than the tie
    for index in range(40):
        batch = sample_batch(torch.stack([x, x]), [row, wide], ["r", "n"], [index, index])
        assert int(batch[0]) == int(row.sample(x, "r", index))


def test_draws_follow_the_softmax() -> None:
    x = logits(1, seed=3)[0] / 3
    probs = torch.softmax(x / 0.8, -1)
    n = 4000
    draws = torch.tensor([int(SamplingParams(temperature=0.8, seed=s).sample(x, "r", 0)) for s in range(n)])
    freq = torch.bincount(draws, minlength=V).float() / n
    assert (freq - probs).abs().max() < 4 * math.sqrt(0.25 / n)  # within 4 standard deviations


def dense_reference(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """Row b: softmax over its own keys ``[S_b, G, d]`` (cache then the new one), grouped-query heads."""
    out = []
    for qb, kb, vb in zip(q, keys, values):  # qb [H, d], kb [S, G, d]
        group = qb.shape[0] // kb.shape[1]
        k, v = kb.repeat_interleave(group, 1).transpose(0, 1), vb.repeat_interleave(group, 1).transpose(0, 1)
        p = torch.softmax(qb[:, None, :] @ k.transpose(1, 2) / math.sqrt(qb.shape[-1]), -1)  # [H, 1, S]
        out.append((p @ v)[:, 0])
    return torch.stack(out)


@given(st.lists(st.integers(0, 70), min_size=1, max_size=12), st.sampled_from([1, 4, 8]), st.integers(0, 99))
def test_bucketed_decode_attention_equals_dense_attention(lens: list[int], block_size: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    G, H, d, num_blocks = 2, 4, 8, 12 * 71  # room for every row at block size 1
    key_blocks, value_blocks = (torch.randn(num_blocks, block_size, G, d, generator=gen) for _ in range(2))
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lens]
    width = max(1, max(map(len, tables)))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    context_lens = torch.tensor(lens)
    q, new_k, new_v = (torch.randn(len(lens), h, d, generator=gen) for h in (H, G, G))
    workspace = GatherWorkspace()
    for _ in range(2):  # the second call reuses the workspace's buffers
        out = paged_attention_heads(q, key_blocks, value_blocks, block_tables, context_lens, new_k, new_v,
                                    workspace=workspace)
    rows = list(enumerate(zip(tables, lens)))
    keys = [torch.cat([key_blocks[t].flatten(0, 1)[:n], new_k[b][None]]) for b, (t, n) in rows]
    values = [torch.cat([value_blocks[t].flatten(0, 1)[:n], new_v[b][None]]) for b, (t, n) in rows]
    torch.testing.assert_close(out, dense_reference(q, keys, values), rtol=1e-5, atol=1e-5)
    assert key_blocks.shape[0] == num_blocks  # the pool is only read


def test_buckets_cover_every_row_once_and_bound_the_padding() -> None:
    lens = torch.tensor([3, 200, 17, 64, 65, 5, 130, 129, 16, 15])
    buckets = decode_buckets(torch.zeros(len(lens), 20, dtype=torch.long), lens, 16)
    rows = sorted(int(r) for b in buckets for r in b.rows)
    assert rows == list(range(len(lens)))
    for b in buckets:
        need = b.lens // 16 + 1  # blocks for the cache and the new token
        assert b.tables.shape[1] == int(need.max())
        assert int((b.tables.shape[1] - need).sum()) <= BUCKET_OVERHEAD_BLOCKS * len(b.rows)
    assert len(buckets) > 1  # 1 block next to 13: not padded together


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(1, 12)), min_size=1, max_size=6), st.integers(0, 99))
def test_prefill_attention_chunk_by_chunk_equals_one_call_over_the_whole_mask(
    chunks: list[tuple[int, int]], seed: int
) -> None:
    starts, lengths = torch.tensor([s for s, _ in chunks]), torch.tensor([n for _, n in chunks])
    mask = cached_prefix_mask(starts, lengths)  # [P, C + P]
    P, C = int(lengths.sum()), int(starts.sum())
    spans = prefill_chunks(mask)
    assert [(c.rows.start, c.rows.stop) for c in spans] == [(int(e - n), int(e)) for e, n in
                                                             zip(lengths.cumsum(0), lengths)]
    assert [c.cached.stop - c.cached.start for c in spans] == starts.tolist()
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(P, 4, 8, generator=gen)
    k, v, cached_k, cached_v = (torch.randn(n, 2, 8, generator=gen) for n in (P, P, C, C))
    whole = grouped_attention(q, torch.cat([cached_k, k]), torch.cat([cached_v, v]), mask)
    by_chunk = chunked_attention(q, k, v, cached_k if C else None, cached_v if C else None, mask, spans)
    torch.testing.assert_close(by_chunk, whole, rtol=1e-6, atol=1e-6)


def test_logits_only_for_the_rows_asked() -> None:
    model = LlamaModel(LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48), seed=1)
    step = LlamaStepModel(model)
    ids = torch.tensor([5, 9, 200, 7, 1])
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    full, k, v = step.forward_prefill_ragged(ids, mask)
    some, k2, v2 = step.forward_prefill_ragged(ids, mask, output_rows=torch.tensor([4, 1]))
    torch.testing.assert_close(some, full[[4, 1]])
    assert torch.equal(k, k2) and torch.equal(v, v2)  # every row's K/V still comes back


@pytest.mark.parametrize("executor", ["fused", "split"])
def test_a_prefill_step_computes_the_lm_head_only_for_the_rows_that_sample(executor: str) -> None:
    from cb_lab.engine import EngineConfig, LLMEngine

    model = LlamaModel(LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=48), seed=1)
    rows_seen: list[int] = []
    model.lm_head.register_forward_hook(lambda _m, args, _o: rows_seen.append(args[0].shape[0]))
    engine = LLMEngine(model, config=EngineConfig(executor=executor, num_blocks=32, block_size=4,
                                                  max_tokens_per_step=64, prefill_chunk_size=8))
    engine.generate([[1] * 20, [2] * 5], SamplingParams(max_tokens=1, temperature=0.0))
    assert sum(rows_seen) == 2  # 25 prompt rows computed, one token each sampled


@given(st.text(min_size=0, max_size=30), st.lists(st.integers(1, 4), min_size=1, max_size=40))
def test_incremental_text_grows_into_the_whole_decode(text: str, steps: list[int]) -> None:
    from cb_lab.detokenizer import IncrementalDetokenizer
    from cb_lab.model.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    ids = tok.encode(text, add_bos=False) + [257]  # the bytes (a character may span tokens), then EOS
    detok, upto, pieces = IncrementalDetokenizer(tok), 0, []
    for n in steps:
        upto = min(upto + n, len(ids))
        pieces.append(detok.add(ids[:upto], finished=upto == len(ids)))
        assert not detok.text.endswith("\ufffd") or upto == len(ids)  # a cut character waits
        assert tok.decode(ids).startswith(detok.text)
    pieces.append(detok.add(ids, finished=True))
    assert "".join(pieces) == detok.text == tok.decode(ids) == text  # the pieces add up to the whole text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_engine_on_cuda_makes_the_cpus_tokens() -> None:
    from cb_lab.engine import EngineConfig, LLMEngine

    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [30] * 21]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = {}
    for device in ("cpu", "cuda"):
        model = LlamaModel(LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96), seed=2).to(device)
        engine = LLMEngine(model, config=EngineConfig(num_blocks=32, block_size=4, prefill_chunk_size=8))
        outs[device] = [o.token_ids for o in engine.generate(prompts, params)]
    assert outs["cuda"] == outs["cpu"]
