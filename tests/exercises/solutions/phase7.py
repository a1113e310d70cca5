"""Phase 7: reference answers (checked by make test with CB_LAB_EXERCISES=solutions)."""

from __future__ import annotations

from typing import Any

import torch

from cb_lab.model.tiny_llm import TinyLLM


def oracle_of(model: TinyLLM, prompt: torch.Tensor, generated: list[torch.Tensor]) -> torch.Tensor:
    L, n = prompt.shape[0], len(generated)
    seq = torch.cat([prompt, *(t[None] for t in generated[: n - 1])])  # [L + n - 1, D]: the last token is never fed
    out, _, _ = model.forward_prefill_dense(seq)
    return out[L - 1 : L + n - 1]  # the output at position L - 1 is token 1


def within_budget(history: list[dict[str, Any]], budget: int) -> bool:
    return all(stats["total_tokens"] <= budget for stats in history)


STEP_ID_AFTER_FAULT = 1  # nothing is written before compute succeeds, so step 1 did not happen
EXTRA_STEPS = 0  # the next step() simply runs step 1 again: same plan, same numbers

EXCEPTIONS = {
    "zero_budget": "ConfigurationError",  # a bad setting
    "negative_max_new_tokens": "ValidationError",  # a malformed value
    "append_wrong_dim": "KVCacheError",  # well-formed rows that do not fit this cache
    "duplicate_req_id": "SchedulerError",  # add_request refuses it
}
