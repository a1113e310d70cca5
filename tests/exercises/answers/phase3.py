"""Phase 3 (docs/learning_materials/phase3_mix.md): your answers. Check: make check PHASE=3"""

from __future__ import annotations

# 1. The plans of steps 0..3 of `python -m demos.demo_prefill_decode_mix --budget 6`: one
#    (decode req_ids, prefill chunks as (req_id, start, end)) pair per step, e.g.
#    (["a"], [("b", 6, 10)]) for "decode=[a] prefill=[b 6:10]".
PLANS_BUDGET_6: list[tuple[list[str], list[tuple[str, int, int]]]] | None = None

# 2. With --budget 16, f's prompt ends in step 2 (f 3:4) and f has max_new_tokens=5: the step
#    in which f finishes. Then the rule: the step a request finishes, from the step its prefill
#    ends and its max_new_tokens.
F_FINISH_STEP_BUDGET_16: int | None = None


def finish_step(prefill_end_step: int, max_new_tokens: int) -> int:
    raise NotImplementedError


# 3. Decode seeded with the last prompt row: which generated tokens (1 = the first) still match.
TOKENS_STILL_RIGHT: list[int] | None = None
