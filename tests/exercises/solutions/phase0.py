"""Phase 0: reference answers (checked by make test with CB_LAB_EXERCISES=solutions)."""

from __future__ import annotations

QUICK_STEPS = 12  # "steps: 12, tokens: 57 (44 prefill + 13 decode), ..."
QUICK_PREFILL_TOKENS = 44  # every prompt row once: the sum of the prompt lengths
QUICK_DECODE_TOKENS = 13

QUICK_GENERATED_TOKENS = 19  # 13 decode tokens + 6 first tokens, one from each request's prefill
