"""Phase 12 (docs/learning_materials/phase12_static_vs_continuous.md): your answers.

Check: make check PHASE=12
"""

from __future__ import annotations

from collections.abc import Sequence

# 1. Padded slots of a static batch of 6 requests at step 0: one generates 11 tokens, five generate 1.
PADDING_B6_N11: int | None = None


# 2. Requests with these output lengths run in static batches of batch_size, in order:
#    mean longest output per batch / mean output.
def speedup_bound(outputs: Sequence[int], batch_size: int) -> float:
    raise NotImplementedError


# 3. In `python -m cb_lab compare --quick`: the preset with the lowest TTFT p50, and the one with the
#    most tokens per step (preset names, e.g. "static").
LOWEST_TTFT_P50: str | None = None
MOST_TOKENS_PER_STEP: str | None = None

# 4. The bound `python -m demos.demo_static_vs_continuous --quick --slots 8` prints (two decimals).
BOUND_SLOTS_8: float | None = None
