"""Phase 4: reference answers (checked by make test with CB_LAB_EXERCISES=solutions)."""

from __future__ import annotations

K_FIRST_TOKEN_STEP = 13  # k's last P: the output at its last prompt row is token 1 (the D at 14 is token 2)
K_TTFT_STEPS = 4  # steps 10..13: one step waiting (.), three with prompt chunks

STEPS_BY_BUDGET = {4: 39, 8: 23, 16: 21}  # a bigger budget: fewer steps, down to the decode tail
UTILISATION_BY_BUDGET = {4: 92, 8: 78, 16: 43}  # ... but emptier steps
MEAN_TTFT_BY_BUDGET = {4: 10.86, 8: 3.36, 16: 2.29}  # ... and shorter waits for the first token

EARLIER_WITH_CHUNK_16 = ["c", "e", "i", "j"]  # a chunk never exceeds the budget left: --chunk 16 acts as 8
STEPS_WITH_CHUNK_16 = 23  # unchanged: n, the last to arrive, gets token 1 in step 18 either way, then 4 decodes
