"""Phase 2 (docs/learning_materials/phase2_ragged.md): your answers. Check: make check PHASE=2"""

from __future__ import annotations

import torch

# 1. The batch of `python -m demos.demo_ragged_mask --quick`: chunks a [0, 3), b [4, 7), c [0, 2).
#    The pos_in_seq of each row of the flat batch, the number of True cells of its mask, and the
#    global_idx of the keys that the row of b at position 5 may attend.
POS_IN_SEQ: list[int] | None = None
MASK_TRUE_CELLS: int | None = None
KEYS_OF_B5: list[int] | None = None


# 2. The [N, N] bool ragged mask of a flat batch whose row i is request seq_idx[i] (an int64
#    request number) at position pos[i] (int64): True where query i may attend key j.
def ragged_mask(seq_idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError


# 3. Which requests still match the oracle with a broken mask (lists of req_ids, e.g. ["a"]):
#    the position rule only (a, b, c in one batch, d alone), and causal_mask(N, N) over a, b, c.
STILL_RIGHT_POSITION_RULE_ONLY: list[str] | None = None
STILL_RIGHT_FLAT_CAUSAL: list[str] | None = None
