"""Phase 11: reference answers (checked by make test with CB_LAB_EXERCISES=solutions)."""

from __future__ import annotations

# a and b take the whole budget; d waits behind c (first come, first served), with c's reason.
SKIPPED_STEP_0 = [("c", "budget"), ("d", "budget")]
# 2 tokens are left, but c's whole prefill (9 rows, 3 blocks) does not fit the 1 block left after a and b's chunks.
SKIPPED_STEP_1 = [("c", "no_blocks"), ("d", "no_blocks")]
C_REASON_WITH_2_SEQS = "max_num_seqs"  # checked before the budget

# step 0: a 0:4; step 1: a 4:6 (a's token 1), b 0:2; step 2: a decodes, b 2:3 (b's token 1);
# step 3: both decode, both finish.
B_TTFT_STEPS = 2  # arrives at 1, first token in step 2: 2 - 1 + 1
B_E2E_STEPS = 3  # last token in step 3: 3 - 1 + 1
A_E2E_STEPS = 4  # arrives at 0, last token in step 3

REPREFILL_ROWS = 10  # the prompt (7) plus the 3 tokens it had

MIN_BLOCKS_NO_PREEMPTION = 7
