"""Phase 8 (docs/learning_materials/phase8_exploration.md): your answers. Check: make check PHASE=8"""

from __future__ import annotations

# 1. python -m cb_lab --requests 20: the prefill tokens and the decode tokens of the whole run.
PREFILL_TOKENS_20: int | None = None
DECODE_TOKENS_20: int | None = None

# 2. python -m cb_lab (budget 8) and python -m cb_lab --budget 4: the steps each run takes.
STEPS_BUDGET_8: int | None = None
STEPS_BUDGET_4: int | None = None

# 3. python -m cb_lab --tanh: the steps it takes, and the first generated token (1-based: token 1, 2, ...)
#    that differs from torch.tanh of the same token in the run without --tanh.
STEPS_WITH_TANH: int | None = None
FIRST_TANH_TOKEN_THAT_DIFFERS: int | None = None
