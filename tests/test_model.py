"""TinyLLM: ragged, chunked and decode paths all equal one-shot dense prefill."""

from __future__ import annotations

import pytest
import torch
from helpers import TOL, make_model
from hypothesis import given, settings
from hypothesis import strategies as st

from cb_lab.attention.dense_attention import causal_mask
from cb_lab.core.batch_builder import build_ragged_batch, ragged_causal_mask, ragged_positions
from cb_lab.core.kv_cache import DenseKVCache, PagedKVCache
from cb_lab.exceptions import ConfigurationError, ModelError
from cb_lab.model.tiny_llm import TinyLLM


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class RecordingAttention:
    def __init__(self) -> None:
        self.calls: list[tuple[str, torch.Tensor]] = []

    def on_attention(self, phase: str, weights: torch.Tensor) -> None:
        self.calls.append((phase, weights.clone()))


# ---------------------------------------------------------------- ragged prefill
@settings(deadline=None, max_examples=30)
@given(
    dim=st.integers(1, 64),
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_ragged_prefill_equals_per_sequence_dense(dim: int, lengths: list[int], seed: int) -> None:
    model = make_model(dim, seed)
    seqs = [randn(n, dim, seed=seed + i) for i, n in enumerate(lengths)]
    tokens, _, mask = build_ragged_batch([(f"r{i}", 0, s) for i, s in enumerate(seqs)])
    out, k, v = model.forward_prefill_ragged(tokens, mask)
    assert out.shape == k.shape == v.shape == (sum(lengths), dim)
    for s, o, kk, vv in zip(seqs, out.split(lengths), k.split(lengths), v.split(lengths)):
        ref_out, ref_k, ref_v = model.forward_prefill_dense(s)
        torch.testing.assert_close(o, ref_out, **TOL)
        torch.testing.assert_close(kk, ref_k, **TOL)
        torch.testing.assert_close(vv, ref_v, **TOL)


def test_dense_prefill_is_causal() -> None:
    """Changing a later token never changes an earlier output row."""
    model = make_model(8, 1)
    x = randn(6, 8, seed=0)
    y = x.clone()
    y[4:] = randn(2, 8, seed=1)
    out_x, _, _ = model.forward_prefill_dense(x)
    out_y, _, _ = model.forward_prefill_dense(y)
    torch.testing.assert_close(out_x[:4], out_y[:4], rtol=0, atol=0)
    assert not torch.allclose(out_x[4:], out_y[4:])


def test_dense_prefill_matches_a_hand_written_forward() -> None:
    """The model's math spelled out with torch ops: RMSNorm, Q/K/V, causal SDPA, O."""
    model = make_model(5, 2)
    x = randn(4, 5, seed=3)
    h = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + model.eps)
    q, k, v = (h @ p.weight.T for p in (model.q_proj, model.k_proj, model.v_proj))
    attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    out, k_got, v_got = model.forward_prefill_dense(x)
    torch.testing.assert_close(out, attn @ model.o_proj.weight.T, **TOL)
    torch.testing.assert_close(k_got, k, **TOL)
    torch.testing.assert_close(v_got, v, **TOL)


# ---------------------------------------------------------------- chunked prefill
@settings(deadline=None, max_examples=30)
@given(
    dim=st.integers(1, 32),
    length=st.integers(2, 16),
    cuts=st.lists(st.integers(1, 15), max_size=5),
    seed=st.integers(0, 2**16),
)
def test_chunked_prefill_with_past_kv_equals_one_shot(dim: int, length: int, cuts: list[int], seed: int) -> None:
    model = make_model(dim, seed)
    x = randn(length, dim, seed=seed)
    ref_out, ref_k, ref_v = model.forward_prefill_dense(x)
    bounds = sorted({0, length, *(c for c in cuts if c < length)})
    cache_k, cache_v = torch.empty(0, dim), torch.empty(0, dim)
    outs = []
    for s, e in zip(bounds, bounds[1:]):
        # cached columns first (all visible), then the chunk's own rows causally
        own = torch.ones(e - s, e - s, dtype=torch.bool).tril()
        mask = torch.cat([torch.ones(e - s, s, dtype=torch.bool), own], dim=1)
        past = (cache_k, cache_v) if s > 0 else None
        out, k, v = model.forward_prefill_ragged(x[s:e], mask if s > 0 else own, past)
        outs.append(out)
        cache_k, cache_v = torch.cat([cache_k, k]), torch.cat([cache_v, v])  # as a cache would
    torch.testing.assert_close(torch.cat(outs), ref_out, **TOL)
    torch.testing.assert_close(cache_k, ref_k, **TOL)
    torch.testing.assert_close(cache_v, ref_v, **TOL)


def test_chunked_prefill_of_several_requests_in_one_batch() -> None:
    """Three requests at different offsets, their cached prefixes concatenated (the executor's layout)."""
    dim = 12
    model = make_model(dim, 7)
    prompts = [randn(n, dim, seed=i) for i, n in enumerate([9, 4, 6])]
    starts, ends = [5, 0, 2], [9, 3, 6]
    refs = [model.forward_prefill_dense(p) for p in prompts]
    past_k = torch.cat([r[1][:s] for r, s in zip(refs, starts)])
    past_v = torch.cat([r[2][:s] for r, s in zip(refs, starts)])
    tokens = torch.cat([p[s:e] for p, s, e in zip(prompts, starts, ends)])
    lengths = [e - s for s, e in zip(starts, ends)]
    seq, pos = ragged_positions(torch.tensor(starts), torch.tensor(lengths))
    c_seq, c_pos = ragged_positions(torch.zeros(3, dtype=torch.long), torch.tensor(starts))
    mask = ragged_causal_mask(seq, pos, torch.cat([c_seq, seq]), torch.cat([c_pos, pos]))
    out, k, v = model.forward_prefill_ragged(tokens, mask, (past_k, past_v))
    for (ref_out, ref_k, ref_v), s, e, o, kk, vv in zip(
        refs, starts, ends, out.split(lengths), k.split(lengths), v.split(lengths)
    ):
        torch.testing.assert_close(o, ref_out[s:e], **TOL)
        torch.testing.assert_close(kk, ref_k[s:e], **TOL)
        torch.testing.assert_close(vv, ref_v[s:e], **TOL)


# ---------------------------------------------------------------- decode
def fill_cache(cache, model: TinyLLM, x: torch.Tensor):
    if x.shape[0]:
        _, k, v = model.forward_prefill_dense(x)
        cache.append(k, v)
    return cache


CACHES = [
    pytest.param(lambda: DenseKVCache(), id="dense"),
    pytest.param(lambda: DenseKVCache(initial_capacity=1), id="dense-cap1"),
    pytest.param(lambda: PagedKVCache(block_size=1), id="paged-bs1"),
    pytest.param(lambda: PagedKVCache(block_size=3), id="paged-bs3"),
    pytest.param(lambda: PagedKVCache(block_size=7), id="paged-bs7"),
]


@pytest.mark.parametrize("new_cache", CACHES)
@pytest.mark.parametrize("T", [1, 2, 5, 13])
@pytest.mark.parametrize("token_rank", [1, 2])
def test_decode_equals_last_row_of_dense_prefill(new_cache, T: int, token_rank: int) -> None:
    dim = 10
    model = make_model(dim, T)
    x = randn(T, dim, seed=T)
    ref_out, ref_k, ref_v = model.forward_prefill_dense(x)
    cache = fill_cache(new_cache(), model, x[:-1])
    before = len(cache)
    token = x[-1] if token_rank == 1 else x[-1:]
    out, k, v = model.forward_decode(token, cache)
    assert out.shape == k.shape == v.shape == (1, dim)
    torch.testing.assert_close(out[0], ref_out[-1], **TOL)
    torch.testing.assert_close(k[0], ref_k[-1], **TOL)
    torch.testing.assert_close(v[0], ref_v[-1], **TOL)
    assert len(cache) == before  # decode only reads the cache


@pytest.mark.parametrize("new_cache", CACHES)
def test_decode_loop_equals_dense_prefill_of_whole_sequence(new_cache) -> None:
    """Append each decode step's K/V, feed its output back: the tokens equal the dense oracle."""
    dim, L, n = 8, 4, 9
    model = make_model(dim, 3)
    prompt = randn(L, dim, seed=3)
    cache = new_cache()
    out, k, v = model.forward_prefill_dense(prompt)
    cache.append(k, v)
    generated = [out[-1]]
    for _ in range(n - 1):
        out, k, v = model.forward_decode(generated[-1], cache)
        cache.append(k, v)
        generated.append(out[0])
    ref_out, ref_k, _ = model.forward_prefill_dense(torch.cat([prompt, torch.stack(generated[:-1])]))
    torch.testing.assert_close(torch.stack(generated), ref_out[L - 1 :], **TOL)
    torch.testing.assert_close(cache.get_kv()[0], ref_k, **TOL)


@pytest.mark.parametrize("new_cache", CACHES)
def test_decode_on_an_empty_cache_attends_only_to_itself(new_cache) -> None:
    model = make_model(6, 4)
    tok = randn(6, seed=4)
    out, k, v = model.forward_decode(tok, new_cache())
    ref_out, ref_k, ref_v = model.forward_prefill_dense(tok[None])
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(out, v @ model.o_proj.weight.T, **TOL)  # softmax over one key is 1
    torch.testing.assert_close(k, ref_k, **TOL)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "16", None])
def test_bad_dim_is_configuration_error(bad: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        TinyLLM(bad)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value)


def test_default_dim_and_seeded_weights() -> None:
    assert TinyLLM().dim == 16
    a, b, c = make_model(8, 0), make_model(8, 0), make_model(8, 1)
    torch.testing.assert_close(a.q_proj.weight, b.q_proj.weight, rtol=0, atol=0)
    assert not torch.equal(a.q_proj.weight, c.q_proj.weight)


BAD_MODEL_CALLS = [
    pytest.param(lambda m: m.forward_prefill_dense(torch.ones(3, 5)), "(3, 5)", id="dense-wrong-dim"),
    pytest.param(lambda m: m.forward_prefill_dense(torch.ones(8)), "(8,)", id="dense-1-d"),
    pytest.param(lambda m: m.forward_prefill_dense(torch.ones(1, 3, 8)), "(1, 3, 8)", id="dense-3-d"),
    pytest.param(
        lambda m: m.forward_prefill_ragged(torch.ones(3, 7), torch.ones(3, 3, dtype=torch.bool)), "(3, 7)",
        id="ragged-wrong-dim",
    ),
    pytest.param(
        lambda m: m.forward_prefill_ragged(torch.ones(3, 8), torch.ones(3, 4, dtype=torch.bool)), "(3, 4)",
        id="ragged-mask-shape",
    ),
    pytest.param(lambda m: m.forward_prefill_ragged(torch.ones(3, 8), torch.ones(3, 3)), "torch.float32",
                 id="ragged-mask-dtype"),
    pytest.param(
        lambda m: m.forward_prefill_ragged(
            torch.ones(3, 8), causal_mask(3, 3), (torch.ones(2, 8), torch.ones(2, 8))
        ),
        "(3, 5)",
        id="ragged-mask-ignores-past",
    ),
    pytest.param(lambda m: m.forward_decode(torch.ones(5), DenseKVCache()), "(1, 5)", id="decode-wrong-dim"),
    pytest.param(lambda m: m.forward_decode(torch.ones(2, 8), DenseKVCache()), "2 rows", id="decode-two-rows"),
    pytest.param(lambda m: m.forward_decode(torch.ones(1, 1, 8), DenseKVCache()), "(1, 1, 8)", id="decode-3-d"),
    pytest.param(lambda m: m.forward_decode(torch.tensor(1.0), DenseKVCache()), "()", id="decode-scalar"),
]


@pytest.mark.parametrize(("call", "needle"), BAD_MODEL_CALLS)
def test_bad_model_inputs_are_model_error(call, needle: str) -> None:
    with pytest.raises(ModelError) as info:
        call(make_model(8))
    assert needle in str(info.value)


# ---------------------------------------------------------------- attention hooks
def test_prefill_hook_sees_probabilities_that_respect_the_mask() -> None:
    dim = 6
    model = make_model(dim, 5)
    hook = RecordingAttention()
    a, b = randn(4, dim, seed=1), randn(3, dim, seed=2)
    tokens, _, mask = build_ragged_batch([("a", 0, a), ("b", 0, b)])
    model.forward_prefill_ragged(tokens, mask, attention_hooks=[hook, hook])
    assert [phase for phase, _ in hook.calls] == ["prefill", "prefill"]
    probs = hook.calls[0][1]
    assert probs.shape == (7, 7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(7), **TOL)
    assert bool((probs[~mask] == 0).all()) and bool((probs[mask] > 0).all())
    q, k, _ = model.project_qkv(tokens)
    ref = torch.softmax((q @ k.T / dim**0.5).masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(probs, ref, **TOL)


def test_prefill_hook_with_past_kv_has_cached_columns_first() -> None:
    dim = 4
    model = make_model(dim, 6)
    x = randn(5, dim, seed=6)
    _, k, v = model.forward_prefill_dense(x[:3])
    hook = RecordingAttention()
    mask = causal_mask(2, 5)
    model.forward_prefill_ragged(x[3:], mask, (k, v), attention_hooks=[hook])
    probs = hook.calls[0][1]
    assert probs.shape == (2, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2), **TOL)
    assert probs[0, 4].item() == 0.0 and bool((probs[:, :3] > 0).all())


@pytest.mark.parametrize("new_cache", CACHES)
def test_decode_hook_probabilities(new_cache) -> None:
    dim, C = 6, 5
    model = make_model(dim, 8)
    x = randn(C + 1, dim, seed=8)
    cache = fill_cache(new_cache(), model, x[:C])
    hook = RecordingAttention()
    model.forward_decode(x[C], cache, attention_hooks=[hook])
    [(phase, probs)] = hook.calls
    assert phase == "decode" and probs.shape[0] == 1
    torch.testing.assert_close(probs.sum(-1), torch.ones(1), **TOL)
    q, k, _ = model.project_qkv(x)
    ref = torch.softmax(q[C] @ k.T / dim**0.5, -1)  # cached rows then the token itself
    # paged: [blocks * block_size] slots (empty ones exactly 0), then the token's own column
    visible = torch.cat([probs[0, :C], probs[0, -1:]])
    torch.testing.assert_close(visible, ref, **TOL)
    assert bool((probs[0, C:-1] == 0).all())


def test_decode_hook_on_empty_cache() -> None:
    model = make_model(3, 9)
    hook = RecordingAttention()
    model.forward_decode(randn(3, seed=9), PagedKVCache(4), attention_hooks=[hook])
    assert hook.calls[0][0] == "decode" and hook.calls[0][1].tolist() == [[1.0]]
