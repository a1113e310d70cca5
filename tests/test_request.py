"""Request: defaults, phase properties, and a life cycle driven by hand (no scheduler)."""

from __future__ import annotations

import pytest
import torch
from helpers import TOL, assert_oracle, make_model, make_request

from cb_lab.core.kv_cache import DenseKVCache, PagedKVCache
from cb_lab.core.request import Request
from cb_lab.exceptions import RequestError, ValidationError


def test_defaults() -> None:
    prompt = torch.randn(5, 4)
    cache = DenseKVCache()
    req = Request("r", prompt, 3, cache)
    assert req.req_id == "r" and req.prompt is prompt and req.kv_cache is cache
    assert req.max_new_tokens == 3
    assert req.prefill_pos == 0
    assert req.generated_tokens == []
    assert req.finished is False
    assert req.decode_seed is None
    assert (req.prompt_len, req.dim) == (5, 4)
    assert req.in_prefill and not req.in_decode


def test_generated_tokens_list_is_not_shared_between_requests() -> None:
    a = make_request("a", 2, 3, 4)
    b = make_request("b", 2, 3, 4)
    a.append_token(torch.ones(4))
    assert b.generated_tokens == [] and len(a.generated_tokens) == 1


def test_get_prefill_chunk_is_a_pure_read() -> None:
    req = make_request("r", 7, 2, 3)
    first = req.get_prefill_chunk(3)
    again = req.get_prefill_chunk(3)
    assert req.prefill_pos == 0  # nothing consumed
    torch.testing.assert_close(first, req.prompt[:3], rtol=0, atol=0)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(req.get_prefill_chunk(100), req.prompt, rtol=0, atol=0)  # clipped
    req.prefill_pos = 5
    torch.testing.assert_close(req.get_prefill_chunk(3), req.prompt[5:7], rtol=0, atol=0)
    req.prefill_pos = 7
    assert req.get_prefill_chunk(3).shape == (0, 3)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, None])
def test_get_prefill_chunk_bad_size(bad) -> None:
    req = make_request("r", 4, 1, 2)
    with pytest.raises(ValidationError) as info:
        req.get_prefill_chunk(bad)
    assert repr(bad) in str(info.value)
    assert req.prefill_pos == 0


@pytest.mark.parametrize("cache", ["dense", "paged"])
def test_life_cycle_by_hand_matches_the_oracle(cache: str) -> None:
    """Chunked prefill, then decode, with the model and the request's own methods only."""
    dim, L, n = 6, 5, 4
    model = make_model(dim, 11)
    req = make_request("r", L, n, dim, cache, block_size=2)
    phases = []
    while req.in_prefill:
        phases.append("prefill")
        s = req.prefill_pos
        chunk = req.get_prefill_chunk(2)
        e = s + chunk.shape[0]
        own = torch.ones(e - s, e - s, dtype=torch.bool).tril()
        if s == 0:
            out, k, v = model.forward_prefill_ragged(chunk, own)
        else:
            mask = torch.cat([torch.ones(e - s, s, dtype=torch.bool), own], dim=1)
            out, k, v = model.forward_prefill_ragged(chunk, mask, req.kv_cache.get_kv())
        req.append_kv(k, v)
        req.prefill_pos = e
        assert len(req.kv_cache) == e
        if e == L:
            assert not req.in_prefill and req.in_decode  # prompt done, no token yet
            req.append_token(out[-1])
    assert phases == ["prefill"] * 3
    seed = req.decode_seed
    torch.testing.assert_close(seed, req.generated_tokens[0], rtol=0, atol=0)
    while not req.finished:
        assert req.in_decode and not req.in_prefill
        out, k, v = model.forward_decode(req.last_token, req.kv_cache)
        req.append_kv(k, v)
        req.append_token(out)  # [1, D] is accepted and stored as [D]
    assert req.decode_seed is seed  # set once, by the first token
    assert not req.in_decode and not req.in_prefill
    assert len(req.generated_tokens) == n and all(t.shape == (dim,) for t in req.generated_tokens)
    assert len(req.kv_cache) == L + n - 1
    assert_oracle(model, req)


def test_append_token_sets_seed_once_and_finishes_at_max_new_tokens() -> None:
    req = make_request("r", 2, 3, 4)
    req.prefill_pos = 2
    toks = [torch.full((4,), float(i)) for i in range(3)]
    req.append_token(toks[0])
    torch.testing.assert_close(req.decode_seed, toks[0], rtol=0, atol=0)
    assert not req.finished and req.in_decode
    torch.testing.assert_close(req.last_token, toks[0], rtol=0, atol=0)
    req.append_token(toks[1][None, :])
    torch.testing.assert_close(req.decode_seed, toks[0], rtol=0, atol=0)  # unchanged
    torch.testing.assert_close(req.last_token, toks[1], rtol=0, atol=0)
    assert not req.finished
    req.append_token(toks[2])
    assert req.finished and not req.in_decode and not req.in_prefill
    torch.testing.assert_close(torch.stack(req.generated_tokens), torch.stack(toks), rtol=0, atol=0)
    with pytest.raises(RequestError) as info:
        req.append_token(torch.zeros(4))
    assert "'r'" in str(info.value) and "3" in str(info.value)
    assert len(req.generated_tokens) == 3  # the refused token was not recorded


def test_zero_new_tokens_is_finished_at_construction() -> None:
    req = make_request("z", 3, 0, 2)
    assert req.finished and not req.in_prefill and not req.in_decode
    assert req.decode_seed is None and req.generated_tokens == []
    with pytest.raises(RequestError, match="'z'"):
        req.append_token(torch.zeros(2))
    assert req.generated_tokens == []


def test_generated_tokens_given_at_construction_count() -> None:
    toks = [torch.zeros(2), torch.ones(2)]
    assert Request("a", torch.randn(3, 2), 2, DenseKVCache(), generated_tokens=list(toks)).finished
    assert not Request("b", torch.randn(3, 2), 3, DenseKVCache(), generated_tokens=list(toks)).finished


def test_last_token_before_any_token_is_request_error() -> None:
    req = make_request("early", 3, 2, 2)
    with pytest.raises(RequestError, match="'early'"):
        req.last_token  # noqa: B018


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(2, 2), torch.zeros(1, 1, 2), torch.tensor(1.0)])
def test_append_token_wrong_shape_is_validation_error(bad: torch.Tensor) -> None:
    req = make_request("r", 3, 2, 2)
    with pytest.raises(ValidationError) as info:
        req.append_token(bad)
    assert str(tuple(bad.shape)) in str(info.value)
    assert req.generated_tokens == [] and req.decode_seed is None


def test_append_kv_goes_to_the_cache() -> None:
    cache = PagedKVCache(block_size=2)
    req = Request("r", torch.randn(3, 4), 1, cache)
    k, v = torch.randn(3, 4), torch.randn(3, 4)
    req.append_kv(k, v)
    assert len(cache) == 3
    torch.testing.assert_close(cache.get_kv()[0], k, rtol=0, atol=0)
    torch.testing.assert_close(cache.get_kv()[1], v, rtol=0, atol=0)


def test_prefill_pos_bounds_are_inclusive() -> None:
    for pos in (0, 3):
        assert Request("r", torch.randn(3, 2), 1, DenseKVCache(), prefill_pos=pos).prefill_pos == pos
    done = Request("r", torch.randn(3, 2), 1, DenseKVCache(), prefill_pos=3)
    assert done.in_decode and not done.in_prefill


def test_repr_shows_phase_and_progress() -> None:
    req = make_request("abc", 4, 2, 3)
    assert repr(req) == "Request('abc', prefill, prefill=0/4, generated=0/2, cache_len=0)"
    req.prefill_pos = 4
    req.append_token(torch.zeros(3))
    assert "decode" in repr(req) and "generated=1/2" in repr(req)


def test_make_request_is_deterministic() -> None:
    a, b = make_request("same", 4, 1, 3), make_request("same", 4, 1, 3)
    torch.testing.assert_close(a.prompt, b.prompt, **TOL)
    assert not torch.equal(a.prompt, make_request("other", 4, 1, 3).prompt)
    assert isinstance(make_request("p", 2, 1, 3, "paged", block_size=5).kv_cache, PagedKVCache)
    assert make_request("p", 2, 1, 3, "paged", block_size=5).kv_cache.block_size == 5
