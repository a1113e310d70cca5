"""Phase 0 (docs/learning_materials/phase0_setup.md): your answers. Check: make check PHASE=0"""

from __future__ import annotations

# 1. From the last lines of `python -m cb_lab --quick`: the number of steps, and the tokens
#    the steps ran in all, split into prefill and decode tokens.
QUICK_STEPS: int | None = None
QUICK_PREFILL_TOKENS: int | None = None
QUICK_DECODE_TOKENS: int | None = None

# 2. How many tokens the 6 requests of `python -m cb_lab --quick` generated in all.
QUICK_GENERATED_TOKENS: int | None = None
