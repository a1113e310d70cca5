"""Phase 2: reference answers (checked by make test with CB_LAB_EXERCISES=solutions)."""

from __future__ import annotations

import torch

POS_IN_SEQ = [0, 1, 2, 4, 5, 6, 0, 1]  # b's chunk starts at 4: its rows 0..3 are in its cache
MASK_TRUE_CELLS = 15  # one lower triangle per chunk: 6 + 6 + 3
KEYS_OF_B5 = [3, 4]  # b 4 and b 5 (b's cached rows 0..3 are extra columns, not batch rows)


def ragged_mask(seq_idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    same_request = seq_idx[:, None] == seq_idx[None, :]  # [N, N]
    not_in_future = pos[None, :] <= pos[:, None]  # [N, N]: key position <= query position
    return same_request & not_in_future


STILL_RIGHT_POSITION_RULE_ONLY = ["d"]  # every row of a, b, c sees the other requests' earlier rows
STILL_RIGHT_FLAT_CAUSAL = ["a"]  # the first request's rows come first: no other rows before them
