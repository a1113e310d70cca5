"""Checks the phase 2 exercises (docs/learning_materials/phase2_ragged.md) against cb-lab itself."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
from given import call, check, given
from helpers import TOL, make_model

from cb_lab.attention.dense_attention import causal_mask
from cb_lab.core.batch_builder import TokenMeta, build_ragged_batch
from cb_lab.model.tiny_llm import TinyLLM
from demos.demo_ragged_mask import QUICK_CHUNKS

PHASE = "phase2"
MaskFn = Callable[[list[TokenMeta]], torch.Tensor]


def test_phase2_token_table(answers: ModuleType) -> None:
    _, meta, mask = build_ragged_batch([(r, s, torch.zeros(n, 8)) for r, s, n in QUICK_CHUNKS])
    check(given(answers, "POS_IN_SEQ") == [m.pos_in_seq for m in meta],
          "POS_IN_SEQ: one position per row of the flat batch; a chunk that starts at start_pos s numbers its "
          "rows s, s + 1, ...")
    check(given(answers, "MASK_TRUE_CELLS") == int(mask.sum()),
          "MASK_TRUE_CELLS: the mask is one lower triangle per request, nothing between requests; how many "
          "cells has a triangle of n rows?")
    b5 = next(m.global_idx for m in meta if (m.req_id, m.pos_in_seq) == ("b", 5))
    check(given(answers, "KEYS_OF_B5") == mask[b5].nonzero().flatten().tolist(),
          "KEYS_OF_B5: the global_idx (row of the flat batch, not the position) of every key b at position 5 "
          "may see: same request, position not after its own")


def test_phase2_ragged_mask(answers: ModuleType) -> None:
    batches = [
        [("a", 0, 1)],
        [("a", 0, 3), ("b", 0, 2)],
        [("a", 0, 3), ("b", 4, 3), ("c", 0, 2)],
        [("x", 2, 1), ("y", 0, 5), ("z", 7, 2), ("w", 0, 1)],
    ]
    for chunks in batches:
        _, meta, expected = build_ragged_batch([(r, s, torch.zeros(n, 8)) for r, s, n in chunks])
        ids = {r: i for i, (r, _, _) in enumerate(chunks)}
        seq_idx = torch.tensor([ids[m.req_id] for m in meta])
        pos = torch.tensor([m.pos_in_seq for m in meta])
        mask = call(answers, "ragged_mask", seq_idx, pos)
        check(isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
              and tuple(mask.shape) == tuple(expected.shape), f"chunks {chunks}: ragged_mask should be [N, N] bool")
        check(torch.equal(mask, expected),
              f"chunks {chunks}: row i may attend row j only if both rules hold: same request, and a key "
              "position not after the query's")
    # Used in a ragged forward, the mask gives each request exactly its own dense prefill.
    model = make_model(8)
    gen = torch.Generator().manual_seed(3)
    prompts = {r: torch.randn(n, 8, generator=gen) for r, n in [("a", 4), ("b", 2), ("c", 5)]}
    tokens, meta, _ = build_ragged_batch([(r, 0, p) for r, p in prompts.items()])
    seq_idx = torch.tensor([list(prompts).index(m.req_id) for m in meta])
    pos = torch.tensor([m.pos_in_seq for m in meta])
    out, _, _ = model.forward_prefill_ragged(tokens, call(answers, "ragged_mask", seq_idx, pos))
    for r, p in prompts.items():
        rows = [m.global_idx for m in meta if m.req_id == r]
        check(torch.allclose(out[rows], model.forward_prefill_dense(p)[0], **TOL),
              f"ragged_mask in a ragged prefill: request {r}'s rows differ from its own dense forward")


def still_right(model: TinyLLM, prompts: dict[str, torch.Tensor], broken_mask: MaskFn) -> list[str]:
    """Prefill ``prompts`` as one ragged batch with ``broken_mask``; the requests that still match."""
    tokens, meta, _ = build_ragged_batch([(r, 0, p) for r, p in prompts.items()])
    out, _, _ = model.forward_prefill_ragged(tokens, broken_mask(meta))
    right = []
    for r, p in prompts.items():
        rows = [m.global_idx for m in meta if m.req_id == r]
        if torch.allclose(out[rows], model.forward_prefill_dense(p)[0], **TOL):
            right.append(r)
    return right


def position_rule_only(meta: list[TokenMeta]) -> torch.Tensor:
    pos = torch.tensor([m.pos_in_seq for m in meta])  # [N]
    return pos[None, :] <= pos[:, None]  # no same-request rule


def flat_causal(meta: list[TokenMeta]) -> torch.Tensor:
    return causal_mask(len(meta), len(meta))  # the flat batch read as one long sequence


def test_phase2_break_mask(answers: ModuleType) -> None:
    model = make_model(8)
    gen = torch.Generator().manual_seed(4)
    prompts = {r: torch.randn(n, 8, generator=gen) for r, n in zip("abcd", (5, 6, 4, 5))}
    abc = {r: prompts[r] for r in "abc"}
    position_only = still_right(model, abc, position_rule_only) + still_right(
        model, {"d": prompts["d"]}, position_rule_only)
    check(sorted(given(answers, "STILL_RIGHT_POSITION_RULE_ONLY")) == position_only,
          "STILL_RIGHT_POSITION_RULE_ONLY: read the per part line of python -m demos.demo_break_it --break mask; "
          "a request still matches when no other request's row can leak into it")
    check(sorted(given(answers, "STILL_RIGHT_FLAT_CAUSAL")) == still_right(model, abc, flat_causal),
          "STILL_RIGHT_FLAT_CAUSAL: causal_mask(N, N) lets a row see every earlier row of the flat batch; "
          "whose rows have no other request's rows before them?")
