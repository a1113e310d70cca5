"""Phase 3: reference answers (checked by make test with CB_LAB_EXERCISES=solutions)."""

from __future__ import annotations

PLANS_BUDGET_6 = [
    ([], [("a", 0, 4), ("b", 0, 2)]),  # b is admitted with what is left of the budget
    ([], [("a", 4, 5), ("b", 2, 6), ("c", 0, 1)]),  # a's last prompt row gives its first token
    (["a"], [("b", 6, 10), ("c", 1, 2)]),  # decode first: a takes 1 token before any prefill
    (["a"], [("b", 10, 12), ("c", 2, 5)]),
]

F_FINISH_STEP_BUDGET_16 = 6  # token 1 in step 2, then tokens 2..5 in steps 3..6


def finish_step(prefill_end_step: int, max_new_tokens: int) -> int:
    # Decode first: a decoding request gets one token every step, so it never waits.
    return prefill_end_step + max_new_tokens - 1


TOKENS_STILL_RIGHT = [1]  # token 1 comes from the prefill; every decode after the wrong input is wrong
