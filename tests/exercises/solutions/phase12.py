"""Phase 12: reference answers (checked by make test with CB_LAB_EXERCISES=solutions)."""

from __future__ import annotations

from collections.abc import Sequence

PADDING_B6_N11 = 50  # (n - 1)(B - 1): 10 pure-decode steps, 5 finished slots in each


def speedup_bound(outputs: Sequence[int], batch_size: int) -> float:
    batches = [outputs[i : i + batch_size] for i in range(0, len(outputs), batch_size)]  # first come, first served
    mean_longest = sum(max(b) for b in batches) / len(batches)
    return mean_longest / (sum(outputs) / len(outputs))


LOWEST_TTFT_P50 = "sjf"  # short requests first: most first tokens come early
MOST_TOKENS_PER_STEP = "continuous_no_chunk"  # a 33-64-row prompt in one step instead of two: fewer steps

BOUND_SLOTS_8 = 3.24  # mean longest 45.0 / mean output 13.9: between the 2.53 of 4 slots and the 4.31 of 16
