"""Phase 4 (docs/learning_materials/phase4_timeline.md): your answers. Check: make check PHASE=4"""

from __future__ import annotations

# 1. From the timeline of `python -m demos.demo_scheduler_timeline`: the step in which request k
#    gets its first token, and its time to first token in steps, counting its arrival step.
K_FIRST_TOKEN_STEP: int | None = None
K_TTFT_STEPS: int | None = None

# 2. Budget 4, 8 and 16 (--budget): the steps of the run, the mean budget utilisation (percent,
#    as printed) and the mean steps to first token (as printed), e.g. {4: ..., 8: ..., 16: ...}.
STEPS_BY_BUDGET: dict[int, int] | None = None
UTILISATION_BY_BUDGET: dict[int, int] | None = None
MEAN_TTFT_BY_BUDGET: dict[int, float] | None = None

# 3. --chunk 16 (budget 8): the requests whose first token comes in fewer steps than with
#    --chunk 4 (a list of req_ids), and the steps of the run.
EARLIER_WITH_CHUNK_16: list[str] | None = None
STEPS_WITH_CHUNK_16: int | None = None
