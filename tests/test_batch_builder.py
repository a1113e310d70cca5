"""build_ragged_batch: token table, TokenMeta and mask against a plain O(N^2) reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cb_lab.core.batch_builder import TokenMeta, build_ragged_batch, ragged_causal_mask, ragged_positions
from cb_lab.exceptions import ValidationError
from cb_lab.model.tiny_llm import TinyLLM


def reference_batch(chunks):
    """The obvious loops: rows end to end, meta per row, mask = same request and k_pos <= q_pos."""
    rows, meta = [], []
    for req_id, start, tokens in chunks:
        for offset in range(tokens.shape[0]):
            meta.append(TokenMeta(req_id, start + offset, len(rows)))
            rows.append(tokens[offset])
    n = len(rows)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            mask[i, j] = meta[i].req_id == meta[j].req_id and meta[j].pos_in_seq <= meta[i].pos_in_seq
    return torch.stack(rows), meta, mask


@st.composite
def chunk_lists(draw, repeat_ids: bool = False):
    """Chunks of distinct requests in any order; with ``repeat_ids``, a request may have several
    chunks (at disjoint positions, in any order)."""
    dim = draw(st.integers(1, 6))
    n_chunks = draw(st.integers(1, 6))
    ids = draw(st.permutations([f"r{i}" for i in range(n_chunks)]))  # unique, arbitrary order
    if repeat_ids:
        ids = [draw(st.sampled_from(ids[:3])) for _ in ids]
    next_free: dict[str, int] = {}
    chunks = []
    for i, req_id in enumerate(ids):
        length = draw(st.integers(1, 8))
        start = next_free.get(req_id, 0) + draw(st.integers(0, 10))
        next_free[req_id] = start + length
        tokens = torch.arange(length * dim, dtype=torch.float32).reshape(length, dim) + 100 * i
        chunks.append((req_id, start, tokens))
    if repeat_ids:
        chunks = draw(st.permutations(chunks))  # a later chunk may come first in the batch
    return chunks


@settings(deadline=None, max_examples=50)
@given(st.booleans().flatmap(lambda repeat: chunk_lists(repeat_ids=repeat)))
def test_batch_matches_quadratic_reference(chunks) -> None:
    tokens, meta, mask = build_ragged_batch(chunks)
    ref_tokens, ref_meta, ref_mask = reference_batch(chunks)
    n = sum(t.shape[0] for _, _, t in chunks)
    assert tokens.shape == (n, chunks[0][2].shape[1])
    torch.testing.assert_close(tokens, ref_tokens, rtol=0, atol=0)
    assert meta == ref_meta
    assert mask.dtype == torch.bool and mask.shape == (n, n)
    assert torch.equal(mask, ref_mask)
    assert bool(mask.diagonal().all())  # every token sees itself: no row is fully masked


@settings(deadline=None, max_examples=50)
@given(chunk_lists(), st.lists(st.integers(0, 6), min_size=6, max_size=6))
def test_ragged_causal_mask_with_cached_prefix_columns(chunks, prefix_lens) -> None:
    """Queries of a batch against [cached prefixes | batch rows], as chunked prefill builds it."""
    starts = torch.tensor([s for _, s, _ in chunks])
    lengths = torch.tensor([t.shape[0] for _, _, t in chunks])
    prefix = torch.tensor(prefix_lens[: len(chunks)])
    q_seq, q_pos = ragged_positions(starts, lengths)
    c_seq, c_pos = ragged_positions(torch.zeros_like(prefix), prefix)
    mask = ragged_causal_mask(q_seq, q_pos, torch.cat([c_seq, q_seq]), torch.cat([c_pos, q_pos]))
    keys = [(b, p) for b, p in zip(c_seq.tolist(), c_pos.tolist())] + list(zip(q_seq.tolist(), q_pos.tolist()))
    queries = list(zip(q_seq.tolist(), q_pos.tolist()))
    ref = torch.tensor([[kb == qb and kp <= qp for kb, kp in keys] for qb, qp in queries], dtype=torch.bool)
    assert mask.shape == (len(queries), len(keys))
    assert torch.equal(mask, ref.reshape(len(queries), len(keys)))


def test_ragged_positions_explicit() -> None:
    seq, pos = ragged_positions(torch.tensor([0, 5, 2]), torch.tensor([3, 1, 2]))
    assert seq.tolist() == [0, 0, 0, 1, 2, 2]
    assert pos.tolist() == [0, 1, 2, 5, 2, 3]


def test_docstring_example() -> None:
    a, b = torch.randn(3, 4), torch.randn(2, 4)
    tokens, meta, mask = build_ragged_batch([("a", 0, a), ("b", 0, b)])
    torch.testing.assert_close(tokens, torch.cat([a, b]), rtol=0, atol=0)
    assert [(m.req_id, m.pos_in_seq, m.global_idx) for m in meta] == [
        ("a", 0, 0), ("a", 1, 1), ("a", 2, 2), ("b", 0, 3), ("b", 1, 4)
    ]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 0, 0, 1, 0],
            [0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_chunk_in_the_middle_of_a_prompt_keeps_its_positions() -> None:
    _, meta, mask = build_ragged_batch([("x", 7, torch.randn(3, 2))])
    assert [m.pos_in_seq for m in meta] == [7, 8, 9]
    assert torch.equal(mask, torch.ones(3, 3, dtype=torch.bool).tril())


def test_order_of_chunks_is_kept() -> None:
    z, a = torch.full((1, 2), 1.0), torch.full((2, 2), 2.0)
    tokens, meta, _ = build_ragged_batch([("z", 0, z), ("a", 4, a)])
    assert [m.req_id for m in meta] == ["z", "a", "a"]
    torch.testing.assert_close(tokens, torch.cat([z, a]), rtol=0, atol=0)


def test_token_meta_fields() -> None:
    assert [f.name for f in dataclasses.fields(TokenMeta)] == ["req_id", "pos_in_seq", "global_idx"]
    m = TokenMeta("r", 3, 9)
    assert (m.req_id, m.pos_in_seq, m.global_idx) == ("r", 3, 9)
    assert m == TokenMeta("r", 3, 9) and m != TokenMeta("r", 3, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.pos_in_seq = 4  # type: ignore[misc]
    _, meta, _ = build_ragged_batch([("a", 2, torch.randn(2, 3)), ("b", 0, torch.randn(1, 3))])
    assert all(type(x.pos_in_seq) is int and type(x.global_idx) is int for x in meta)  # plain ints, not tensors
    assert meta == [TokenMeta("a", 2, 0), TokenMeta("a", 3, 1), TokenMeta("b", 0, 2)]


def test_two_chunks_of_one_request_in_one_batch_equal_the_dense_forward() -> None:
    """The original cb-lab's case: A's rows 0..1, B, then A's row 2. The mask goes by request, so
    A's second chunk sees its first; through the ragged forward, A's three rows equal one dense
    forward of A's whole prompt, and B's row its own."""
    torch.manual_seed(0)
    model = TinyLLM(dim=8)
    a, b = torch.randn(3, 8), torch.randn(1, 8)
    tokens, meta, mask = build_ragged_batch([("A", 0, a[:2]), ("B", 0, b), ("A", 2, a[2:])])
    assert [(m.req_id, m.pos_in_seq) for m in meta] == [("A", 0), ("A", 1), ("B", 0), ("A", 2)]
    assert mask[3].tolist() == [True, True, False, True]  # A2 sees A0, A1 (the earlier chunk) and itself
    torch.testing.assert_close(mask, reference_batch([("A", 0, a[:2]), ("B", 0, b), ("A", 2, a[2:])])[2])
    out, _, _ = model.forward_prefill_ragged(tokens, mask)
    torch.testing.assert_close(out[[0, 1, 3]], model.forward_prefill_dense(a)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[[2]], model.forward_prefill_dense(b)[0], rtol=1e-5, atol=1e-5)
    one_chunk, _, _ = model.forward_prefill_ragged(*build_ragged_batch([("A", 0, a), ("B", 0, b)])[::2])
    torch.testing.assert_close(out[[0, 1, 3, 2]], one_chunk, rtol=1e-5, atol=1e-5)  # the same as one chunk of A


def test_no_chunks_give_the_empty_batch() -> None:
    tokens, meta, mask = build_ragged_batch([])
    assert tuple(tokens.shape) == (0, 0) and tokens.dtype == torch.float32
    assert meta == []
    assert tuple(mask.shape) == (0, 0) and mask.dtype == torch.bool
    assert repr(build_ragged_batch([])) == "RaggedBatch(0 rows, dim 0)"


T = torch.ones(2, 3)
BAD_CHUNKS = [
    pytest.param([("dup", 0, T), ("dup", 1, T)], "'dup'", id="overlapping-chunks-of-one-request"),
    pytest.param([("d", 4, T), ("e", 0, T), ("d", 3, T)], "[3, 5) and [4, 6)", id="overlap-out-of-order"),
    pytest.param([("a", 0, T), ("b", 0, torch.ones(2, 4))], "[3, 4]", id="mixed-dims"),
    pytest.param([("a", -1, T)], "-1", id="negative-start"),
    pytest.param([("a", True, T)], "True", id="bool-start"),
    pytest.param([("a", 1.5, T)], "1.5", id="float-start"),
    pytest.param([("a", 0, [[1.0, 2.0, 3.0]])], "list", id="non-tensor-tokens"),
    pytest.param([("a", 0, torch.ones(3))], "(3,)", id="1-d-tokens"),
    pytest.param([("a", 0, torch.ones(1, 2, 3))], "(1, 2, 3)", id="3-d-tokens"),
    pytest.param([("a", 0, torch.ones(0, 3))], "(0, 3)", id="empty-chunk"),
    pytest.param([["a", 0, T]], "['a', 0,", id="list-not-tuple"),
    pytest.param([("a", 0)], "('a', 0)", id="tuple-of-two"),
    pytest.param([(7, 0, T)], "7", id="non-str-req-id"),
    pytest.param([("ok", 0, T), ("bad", -4, T)], "-4", id="second-chunk-bad"),
]


@pytest.mark.parametrize(("chunks", "needle"), BAD_CHUNKS)
def test_bad_chunks_raise_validation_error_naming_the_value(chunks, needle) -> None:
    with pytest.raises(ValidationError) as info:
        build_ragged_batch(chunks)
    assert needle in str(info.value)
