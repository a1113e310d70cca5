"""Phase 8: reference answers (checked by make test with CB_LAB_EXERCISES=solutions)."""

from __future__ import annotations

PREFILL_TOKENS_20 = 270  # the sum of the 20 prompt lengths: every prompt row runs once
DECODE_TOKENS_20 = 146  # sum(max_new_tokens) - 20: each request's token 1 comes from its prefill

STEPS_BUDGET_8 = 44
STEPS_BUDGET_4 = 75  # the same 259 tokens in fewer tokens per step; budget used rises from 74% to 86%

STEPS_WITH_TANH = 44  # the schedule depends on lengths only, never on the values
FIRST_TANH_TOKEN_THAT_DIFFERS = 2  # token 1 comes from the same prefill; token 2 is fed tanh(token 1)
