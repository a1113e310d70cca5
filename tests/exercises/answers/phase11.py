"""Phase 11 (docs/learning_materials/phase11_serving.md): your answers. Check: make check PHASE=11"""

from __future__ import annotations

# 1. BlockPool(5, 4, 8), budget 8, chunk 4, max_num_seqs=3; at step 0: a (prompt 8, 4 tokens), b (6, 3),
#    c (9, 2), d (1, 2). plan.skipped of steps 0 and 1 as [(req_id, reason), ...];
#    and c's reason at step 0 when max_num_seqs=2.
SKIPPED_STEP_0: list[tuple[str, str]] | None = None
SKIPPED_STEP_1: list[tuple[str, str]] | None = None
C_REASON_WITH_2_SEQS: str | None = None

# 2. Budget 4, chunk 4: a (prompt 6, 3 tokens) added at step 0, b (prompt 3, 2 tokens) just before step 1.
#    b's TTFT and e2e, and a's e2e, in steps.
B_TTFT_STEPS: int | None = None
B_E2E_STEPS: int | None = None
A_E2E_STEPS: int | None = None

# 3. Rows of the next prefill of a request (7-row prompt, max_new_tokens=6) preempted after 3 tokens.
REPREFILL_ROWS: int | None = None

# 4. The smallest --num-blocks with which `python -m demos.demo_admission_preemption --quick` preempts nothing.
MIN_BLOCKS_NO_PREEMPTION: int | None = None
