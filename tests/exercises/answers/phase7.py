"""Phase 7 (docs/learning_materials/phase7_tests.md): your answers. Check: make check PHASE=7"""

from __future__ import annotations

from typing import Any

import torch

from cb_lab.model.tiny_llm import TinyLLM


# 1. The oracle: the [n, D] tokens a request with `prompt` [L, D] and these n generated tokens must hold,
#    from ONE dense forward (no cache, no mask tricks).
def oracle_of(model: TinyLLM, prompt: torch.Tensor, generated: list[torch.Tensor]) -> torch.Tensor:
    raise NotImplementedError


# 2. A property: True iff no step of `history` (Scheduler.step() stats dicts) ran more than `budget` tokens.
def within_budget(history: list[dict[str, Any]], budget: int) -> bool:
    raise NotImplementedError


# 3. Fault injection, fused executor, the model's 2nd forward raises: the scheduler's step_id right after
#    that step() raised, and how many more completed steps the whole run takes than a run without the fault.
STEP_ID_AFTER_FAULT: int | None = None
EXTRA_STEPS: int | None = None

# 4. The exception class name (e.g. "ValueError") each bad call raises; keys as on the page.
EXCEPTIONS: dict[str, str] | None = None
