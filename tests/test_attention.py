"""Attention kernels: dense (vs torch SDPA), causal alignment, ragged validation, paged vs dense."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cb_lab.attention.dense_attention import causal_mask, dense_causal_attention, scaled_dot_product_attention
from cb_lab.attention.paged_attention import paged_attention
from cb_lab.attention.ragged_attention import ragged_attention
from cb_lab.exceptions import ModelError

TOL = {"rtol": 1e-5, "atol": 1e-5}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- dense
@pytest.mark.parametrize(("nq", "nk", "d"), [(1, 1, 1), (3, 5, 4), (8, 8, 16), (5, 12, 7)])
def test_sdpa_without_mask_matches_torch(nq: int, nk: int, d: int) -> None:
    g = gen(nq * 100 + nk)
    q, k, v = torch.randn(nq, d, generator=g), torch.randn(nk, d, generator=g), torch.randn(nk, d, generator=g)
    out, probs = scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), **TOL)
    torch.testing.assert_close(probs, torch.softmax(q @ k.T / d**0.5, dim=-1), **TOL)
    torch.testing.assert_close(probs.sum(-1), torch.ones(nq), **TOL)


@pytest.mark.parametrize("seed", range(5))
def test_sdpa_boolean_mask_matches_torch_and_masked_keys_get_zero(seed: int) -> None:
    g = gen(seed)
    B, H, nq, nk, d = 2, 3, 6, 9, 8  # leading batch dims broadcast
    q, k, v = (torch.randn(B, H, n, d, generator=g) for n in (nq, nk, nk))
    mask = torch.rand(B, H, nq, nk, generator=g) < 0.5
    mask[..., 0] = True  # no fully masked row
    out, probs = scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **TOL)
    assert bool((probs[~mask] == 0).all())  # exactly zero, not just small
    assert bool((probs[mask] > 0).all())
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, H, nq), **TOL)


def test_sdpa_mask_broadcasts_over_batch() -> None:
    g = gen(11)
    q, k, v = torch.randn(4, 3, 5, generator=g), torch.randn(4, 6, 5, generator=g), torch.randn(4, 6, 5, generator=g)
    mask = causal_mask(3, 6)  # [3, 6] shared by the 4 batch entries
    out, _ = scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **TOL)


def test_masked_key_values_cannot_leak() -> None:
    """Huge values behind a masked key must not move the output at all (no clamping leak)."""
    g = gen(3)
    q, k, v = torch.randn(2, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out, _ = scaled_dot_product_attention(q, k, v, mask)
    v2 = v.clone()
    v2[2] = 1e30
    k2 = k.clone()
    k2[2] = 1e3  # would dominate the softmax if it were not -inf before it
    out2, probs2 = scaled_dot_product_attention(q, k2, v2, mask)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    assert bool((probs2[:, 2] == 0).all())


@pytest.mark.parametrize(("q_len", "k_len"), [(1, 1), (1, 7), (3, 3), (3, 8), (5, 6), (4, 20)])
def test_causal_mask_is_lower_right_aligned(q_len: int, k_len: int) -> None:
    ref = torch.tensor(
        [[j <= k_len - q_len + i for j in range(k_len)] for i in range(q_len)], dtype=torch.bool
    )
    mask = causal_mask(q_len, k_len)
    assert mask.dtype == torch.bool and torch.equal(mask, ref)
    assert bool(mask[-1].all())  # the last query sees every key
    if q_len < k_len:
        # torch's is_causal aligns to the upper left: a different mask, which is the gotcha
        upper_left = torch.ones(q_len, k_len, dtype=torch.bool).tril()
        assert not torch.equal(mask, upper_left)


def test_dense_causal_attention_of_a_suffix_equals_the_tail_of_full_attention() -> None:
    """Queries for the last 3 of 8 positions over all 8 keys == rows 5..7 of full causal attention."""
    g = gen(5)
    q, k, v = (torch.randn(8, 6, generator=g) for _ in range(3))
    full, _ = dense_causal_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # square: alignments agree
    torch.testing.assert_close(full, ref, **TOL)
    tail, probs = dense_causal_attention(q[5:], k, v)
    torch.testing.assert_close(tail, full[5:], **TOL)
    assert probs.shape == (3, 8) and bool((probs[0, 6:] == 0).all())


# ---------------------------------------------------------------- ragged
def test_ragged_attention_equals_per_sequence_attention() -> None:
    g = gen(9)
    lens, d = [3, 1, 4], 5
    q, k, v = (torch.randn(sum(lens), d, generator=g) for _ in range(3))
    seq = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    pos = torch.cat([torch.arange(n) for n in lens])
    mask = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
    out, probs = ragged_attention(q, k, v, mask)
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        ref = F.scaled_dot_product_attention(q[sl], k[sl], v[sl], is_causal=True)
        torch.testing.assert_close(out[sl], ref, **TOL)
        start += n
    assert bool((probs[~mask] == 0).all())


@pytest.mark.parametrize(
    ("mask", "needle"),
    [
        pytest.param(torch.ones(3, 4, dtype=torch.bool), "(3, 4)", id="wrong-shape"),
        pytest.param(torch.ones(4, 3, dtype=torch.bool), "(4, 3)", id="transposed"),
        pytest.param(torch.ones(3, 3), "torch.float32", id="float-mask"),
        pytest.param(torch.ones(3, 3, dtype=torch.int64), "torch.int64", id="int-mask"),
        pytest.param(torch.ones(1, 3, 3, dtype=torch.bool), "(1, 3, 3)", id="3-d-mask"),
    ],
)
def test_ragged_attention_bad_mask_is_model_error(mask: torch.Tensor, needle: str) -> None:
    q = k = v = torch.randn(3, 2)
    with pytest.raises(ModelError) as info:
        ragged_attention(q, k, v, mask)
    assert needle in str(info.value)


# ---------------------------------------------------------------- paged
def build_paged_pool(context_lens: list[int], block_size: int, d: int, seed: int):
    """Scatter each request's rows into shuffled blocks of one pool; return pool, tables and the rows."""
    g = gen(seed)
    blocks_needed = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_needed) + 3  # a few blocks nobody owns (filled with noise)
    ids = torch.randperm(num_blocks, generator=g).tolist()
    key_cache = torch.randn(num_blocks, block_size, d, generator=g)
    value_cache = torch.randn(num_blocks, block_size, d, generator=g)
    max_blocks = max(blocks_needed)
    tables, per_request = [], []
    for n, nb in zip(context_lens, blocks_needed):
        own, ids = ids[:nb], ids[nb:]
        k_rows, v_rows = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        for p in range(n):
            key_cache[own[p // block_size], p % block_size] = k_rows[p]
            value_cache[own[p // block_size], p % block_size] = v_rows[p]
        tables.append(own + [ids[0]] * (max_blocks - nb))  # pad with a foreign block: must be masked out
        per_request.append((k_rows, v_rows))
    return key_cache, value_cache, torch.tensor(tables), torch.tensor(context_lens), per_request


@pytest.mark.parametrize("block_size", [1, 3, 4])
@pytest.mark.parametrize("with_new", [False, True])
def test_paged_attention_equals_dense_over_flattened_rows(block_size: int, with_new: bool) -> None:
    context_lens, d = [5, 11, 1], 6
    key_cache, value_cache, tables, lens, per_request = build_paged_pool(context_lens, block_size, d, seed=block_size)
    g = gen(99)
    query = torch.randn(3, d, generator=g)
    new_k, new_v = torch.randn(3, d, generator=g), torch.randn(3, d, generator=g)
    if with_new:
        out, probs = paged_attention(query, key_cache, value_cache, tables, lens, new_k, new_v)
    else:
        out, probs = paged_attention(query, key_cache, value_cache, tables, lens)
    S = tables.shape[1] * block_size
    assert out.shape == (3, d) and probs.shape == (3, S + int(with_new))
    for b, (k_rows, v_rows) in enumerate(per_request):
        keys, values = k_rows, v_rows
        if with_new:
            keys, values = torch.cat([k_rows, new_k[b : b + 1]]), torch.cat([v_rows, new_v[b : b + 1]])
        ref = F.scaled_dot_product_attention(query[b : b + 1], keys, values)
        torch.testing.assert_close(out[b : b + 1], ref, **TOL)
        n = context_lens[b]
        assert bool((probs[b, n:S] == 0).all())  # empty slots and padding blocks get nothing
        ref_probs = torch.softmax(query[b] @ keys.T / d**0.5, dim=-1)
        torch.testing.assert_close(probs[b, :n], ref_probs[:n], **TOL)
        if with_new:
            torch.testing.assert_close(probs[b, S], ref_probs[n], **TOL)


def test_paged_attention_with_empty_context_attends_only_to_itself() -> None:
    g = gen(4)
    d = 3
    key_cache, value_cache = torch.randn(2, 2, d, generator=g), torch.randn(2, 2, d, generator=g)
    query, new_k, new_v = (torch.randn(2, d, generator=g) for _ in range(3))
    out, probs = paged_attention(
        query, key_cache, value_cache, torch.tensor([[0], [1]]), torch.tensor([0, 2]), new_k, new_v
    )
    torch.testing.assert_close(out[0], new_v[0], **TOL)  # one visible key: probability 1
    assert probs[0].tolist() == [0.0, 0.0, 1.0]
    keys, values = torch.cat([key_cache[1], new_k[1:]]), torch.cat([value_cache[1], new_v[1:]])
    ref = F.scaled_dot_product_attention(query[1:], keys, values)
    torch.testing.assert_close(out[1:], ref, **TOL)
