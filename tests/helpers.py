"""Shared test helpers: a seeded model, ready-made requests, and DESIGN.md's oracle.

Import them in any test module as plain functions::

    from helpers import make_model, make_request, oracle_tokens, assert_oracle

``tests/`` has no ``__init__.py``; ``conftest.py`` puts this directory on ``sys.path``
(pytest's default ``prepend`` import mode does too), so ``helpers`` is a top-level module.
The same functions are also available as fixtures (see ``conftest.py``).

**The oracle** (DESIGN.md section 2): whatever the schedule, a request's generated tokens
equal the rows ``L-1 .. L+n-2`` of ``forward_prefill_dense(cat(prompt, generated[:-1]))``,
to float32 rounding (after the sampler, when the scheduler has one).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Literal

import torch

from cb_lab.core.invariants import expected_cache_len
from cb_lab.core.kv_cache import BaseKVCache, DenseKVCache, PagedKVCache
from cb_lab.core.request import Request
from cb_lab.model.llama import LlamaModel
from cb_lab.model.llama_config import LlamaConfig
from cb_lab.model.tiny_llm import TinyLLM

__all__ = [
    "TOL",
    "assert_cache_oracle",
    "assert_oracle",
    "make_cache",
    "make_llama",
    "make_model",
    "make_request",
    "oracle_sequence",
    "oracle_tokens",
]

TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32 rounding between batched and naive paths

Sampler = Callable[[torch.Tensor], torch.Tensor]


def make_model(dim: int = 16, seed: int = 0) -> TinyLLM:
    """A TinyLLM whose weights depend only on ``(dim, seed)``; the global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyLLM(dim)


def make_llama(vocab_size: int = 97, seed: int = 2) -> LlamaModel:
    """A small Llama (dim 32, 2 layers, 4 heads over 2 kv heads) with weights far from uniform logits."""
    model = LlamaModel(LlamaConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48),
                       seed=seed)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.3 * noise)
    return model


def make_cache(
    cache: Literal["dense", "paged"] | BaseKVCache = "dense",
    block_size: int = 4,
    device: torch.device | str | None = None,
) -> BaseKVCache:
    """A fresh cache by kind name (an existing cache is passed through unchanged)."""
    if isinstance(cache, BaseKVCache):
        return cache
    if cache == "dense":
        return DenseKVCache(device)
    if cache == "paged":
        return PagedKVCache(block_size=block_size, device=device)
    raise ValueError(f"cache must be 'dense', 'paged' or a BaseKVCache, got {cache!r}")


def make_request(
    req_id: str,
    L: int,
    n: int,
    dim: int = 16,
    cache: Literal["dense", "paged"] | BaseKVCache = "dense",
    block_size: int = 4,
    *,
    seed: int | None = None,
    prompt: torch.Tensor | None = None,
) -> Request:
    """A request with an ``[L, dim]`` standard-normal prompt and ``max_new_tokens = n``.

    The prompt depends only on ``seed`` (default: a hash of ``req_id``), so two calls with
    the same arguments give equal prompts. Pass ``prompt`` to use your own rows instead.
    ``cache`` is ``"dense"``, ``"paged"`` (with ``block_size``) or a cache object to share.
    """
    if prompt is None:
        gen = torch.Generator().manual_seed(zlib.crc32(req_id.encode()) if seed is None else seed)
        prompt = torch.randn(L, dim, generator=gen)
    return Request(req_id, prompt, n, make_cache(cache, block_size))


def oracle_sequence(req: Request) -> torch.Tensor:
    """``cat(prompt, generated[:-1])``: every row the request's cache should end up holding."""
    fed_back = req.generated_tokens[:-1]
    if not fed_back:
        return req.prompt
    return torch.cat([req.prompt, torch.stack(fed_back).to(req.prompt.dtype)])


def oracle_tokens(model: TinyLLM, req: Request, sampler: Sampler | None = None) -> torch.Tensor:
    """``[n, D]``: the tokens a correct schedule must have produced for ``req`` so far.

    Rows ``L-1 .. L+n-2`` of ``model.forward_prefill_dense(cat(prompt, generated[:-1]))[0]``,
    each passed through ``sampler`` when one is given (``n = len(req.generated_tokens)``).
    """
    n, L = len(req.generated_tokens), req.prompt_len
    if n == 0:
        return req.prompt.new_empty((0, req.dim))
    out, _, _ = model.forward_prefill_dense(oracle_sequence(req))
    rows = out[L - 1 : L + n - 1]
    if sampler is not None:
        rows = torch.stack([sampler(row) for row in rows])
    return rows


def assert_cache_oracle(model: TinyLLM, req: Request) -> None:
    """The cache holds exactly the K/V rows dense prefill gives for the positions run so far.

    Row count: the prefill rows run so far plus one per token fed back by a decode, i.e.
    ``prefill_pos + max(n - r - 1, 0)`` with ``n`` tokens generated and ``r`` of them re-run
    by the prefill after a preemption (``r = prefill_len - L``; ``L + n - 1`` once finished, 0 for
    a zero-token request); contents: the dense ``k, v`` of those positions.
    """
    expected_len = expected_cache_len(req)
    assert len(req.kv_cache) == expected_len, (
        f"{req!r}: cache holds {len(req.kv_cache)} rows, expected {expected_len}"
    )
    if expected_len == 0:
        return
    _, k_ref, v_ref = model.forward_prefill_dense(oracle_sequence(req)[:expected_len])
    k, v = req.kv_cache.get_kv()
    torch.testing.assert_close(k.to(k_ref.dtype), k_ref, **TOL)
    torch.testing.assert_close(v.to(v_ref.dtype), v_ref, **TOL)


def assert_oracle(
    model: TinyLLM, req: Request, *, sampler: Sampler | None = None, check_cache: bool = True
) -> None:
    """``req.generated_tokens`` match the oracle (rtol = atol = 1e-5).

    Works mid-run too. A finished request must also hold exactly ``max_new_tokens`` tokens.
    With ``check_cache`` the cache rows are checked against dense prefill as well.
    """
    if req.finished:
        assert len(req.generated_tokens) == req.max_new_tokens, (
            f"{req!r} is finished with {len(req.generated_tokens)} tokens, expected {req.max_new_tokens}"
        )
    expected = oracle_tokens(model, req, sampler)
    got = (
        torch.stack(req.generated_tokens)
        if req.generated_tokens
        else req.prompt.new_empty((0, req.dim))
    )
    torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"{req!r} deviates from the oracle:\n{m}")
    if check_cache:
        assert_cache_oracle(model, req)
