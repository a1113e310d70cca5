"""Checks the phase 6 exercises (docs/learning_materials/phase6_attention.md) against cb-lab itself."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from given import call, check, given
from helpers import TOL, make_model

from cb_lab.attention.dense_attention import (
    dense_causal_attention,
    scaled_dot_product_attention,
)
from cb_lab.attention.paged_attention import GatherWorkspace, paged_attention
from cb_lab.core.batch_builder import build_ragged_batch

PHASE = "phase6"


def test_phase6_one_sequence(answers: ModuleType) -> None:
    model = make_model(8)
    prompt = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    dense_out, _, _ = model.forward_prefill_dense(prompt)
    tokens, _, mask = build_ragged_batch([("a", 0, prompt)])
    ragged_out, _, _ = model.forward_prefill_ragged(tokens, mask)
    torch.testing.assert_close(ragged_out, dense_out, **TOL)  # one sequence: the ragged path is dense attention
    unmasked_out, _, _ = model.forward_prefill_ragged(tokens, torch.ones(6, 6, dtype=torch.bool))
    matching = [i for i in range(6) if torch.allclose(unmasked_out[i], dense_out[i], **TOL)]
    check(given(answers, "ROWS_THAT_MATCH_WITHOUT_MASK") == matching,
          "ROWS_THAT_MATCH_WITHOUT_MASK: without the mask every row also sees the rows after it; for which rows "
          "does that add nothing?")


def test_phase6_paged_gather(answers: ModuleType) -> None:
    block_size, dim = 4, 8
    gen = torch.Generator().manual_seed(4)
    key_cache = torch.randn(10, block_size, dim, generator=gen)  # [num_blocks, block_size, D]
    value_cache = torch.randn(10, block_size, dim, generator=gen)
    block_tables = torch.tensor([[0, 1, 9], [2, 3, 4], [5, 9, 9]])  # [B, max_blocks]; 9 = padding
    context_lens = torch.tensor([5, 12, 1])
    workspace = GatherWorkspace()  # a fresh workspace's buffer is exactly as long as the first gather
    paged_attention(torch.randn(3, dim, generator=gen), key_cache, value_cache, block_tables, context_lens,
                    workspace=workspace)
    check(given(answers, "BLOCKS_GATHERED") == workspace.buffers["keys"].shape[0],
          "BLOCKS_GATHERED: per row, only the blocks its context_len reaches into (block_size 4)")
    check(given(answers, "BLOCKS_IF_PADDED") == block_tables.numel(),
          "BLOCKS_IF_PADDED: every entry of the block_tables tensor, padding included")


def test_phase6_break_clamp(answers: ModuleType) -> None:
    gen = torch.Generator().manual_seed(5)
    chunks = [(r, 0, torch.randn(n, 8, generator=gen)) for r, n in zip("abc", (5, 6, 4))]
    tokens, meta, mask = build_ragged_batch(chunks)  # 15 rows; mask [15, 15]
    q, k, v = (torch.randn(tokens.shape[0], 8, generator=gen) for _ in range(3))
    _, probs = scaled_dot_product_attention(q, k, v, mask)  # [15, 15]; masked keys get exactly 0
    leak = (probs.clamp(min=1e-3) * ~mask).sum(dim=1)  # [15]: what each row gives to keys it must not see
    row = {(m.req_id, m.pos_in_seq): m.global_idx for m in meta}
    check(given(answers, "LEAK_B0") == pytest.approx(leak[row["b", 0]].item(), rel=1e-4),
          "LEAK_B0: a forbidden key's probability is exactly 0 before the clamp and 1e-3 after it; how many of "
          "the 15 keys may row b0 not see?")
    check(given(answers, "LEAK_B5") == pytest.approx(leak[row["b", 5]].item(), rel=1e-4),
          "LEAK_B5: the same count for b's last row, which sees all 6 of b's rows")


def test_phase6_sdpa_is_causal(answers: ModuleType) -> None:
    # Zero queries score every key alike, so with v = eye(8) each output row is its probabilities:
    # the non-zero entries are the keys that row may see.
    gen = torch.Generator().manual_seed(6)
    out = F.scaled_dot_product_attention(torch.zeros(3, 8), torch.randn(8, 8, generator=gen), torch.eye(8),
                                         is_causal=True)  # [3, 8]
    check(given(answers, "IS_CAUSAL_KEYS_SEEN") == (out > 0).sum(dim=1).tolist(),
          "IS_CAUSAL_KEYS_SEEN: is_causal=True builds tril(ones(L, S)): aligned to the upper left, as if the "
          "queries were positions 0, 1, 2")
    for q_len, k_len in [(1, 1), (3, 8), (4, 4), (2, 9)]:
        q, k, v = (torch.randn(n, 8, generator=gen) for n in (q_len, k_len, k_len))
        got = call(answers, "chunk_sdpa", q, k, v)
        want, _ = dense_causal_attention(q, k, v)
        check(got.shape == want.shape and torch.allclose(got, want, **TOL),
              f"chunk_sdpa: {q_len} queries over {k_len} keys differ from dense_causal_attention; the queries are "
              "the LAST positions: align the mask to the lower right")
