"""Checks the phase 7 exercises (docs/learning_materials/phase7_tests.md) against cb-lab itself."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import torch
from given import call, check, given
from helpers import TOL, make_model, make_request

from cb_lab.core.kv_cache import DenseKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.exceptions import CBLabException
from cb_lab.model.oracle import naive_tokens
from cb_lab.model.tiny_llm import TinyLLM

PHASE = "phase7"


def finished_run(budget: int, chunk: int, dim: int = 8) -> tuple[TinyLLM, list[Request], list[dict[str, Any]]]:
    model = make_model(dim)
    sched = Scheduler(model, budget, chunk)
    reqs = [make_request(f"r{i}", L, n, dim, seed=i) for i, (L, n) in enumerate([(5, 4), (2, 6), (7, 3), (1, 1)])]
    for req in reqs:
        sched.add_request(req)
    return model, reqs, sched.run_until_complete()


def test_phase7_oracle(answers: ModuleType) -> None:
    model, reqs, _ = finished_run(budget=5, chunk=2)
    for req in reqs:
        got = call(answers, "oracle_of", model, req.prompt, list(req.generated_tokens))
        check(tuple(got.shape) == (req.max_new_tokens, req.dim), "oracle_of: one [D] row per generated token")
        check(torch.allclose(got, naive_tokens(model, req), **TOL),  # the library's oracle
              "oracle_of: the output row of the dense forward at position L - 1 + i is generated token i + 1; "
              "which rows do you feed it (the last generated token is never fed back)?")
        check(torch.allclose(got, torch.stack(req.generated_tokens), **TOL),  # and what the batched run made
              "oracle_of: your rows differ from the tokens of a batched run")


def test_phase7_within_budget(answers: ModuleType) -> None:
    for budget, chunk in [(1, 1), (3, 2), (8, 4)]:
        _, _, history = finished_run(budget, chunk)
        check(call(answers, "within_budget", history, budget) is True,
              f"within_budget: a real run at budget {budget} keeps to it (return True or False, a bool)")
        busiest = max(s["total_tokens"] for s in history)
        check(call(answers, "within_budget", history, busiest - 1) is False,
              f"within_budget: with the budget {busiest - 1}, the run's busiest step ({busiest} tokens) is over it")
    _, _, history = finished_run(8, 4)
    over = [dict(s) for s in history]
    over[-1].update(decode_tokens=9, total_tokens=9 + over[-1]["prefill_tokens"])  # one step over, at the end
    check(call(answers, "within_budget", over, 8) is False, "within_budget: the last step ran more than 8 tokens")
    check(call(answers, "within_budget", [], 8) is True, "within_budget: no steps, no violation")


class FaultyModel:
    """The model, except that forward call number ``fail_call`` raises (tests/test_scheduler.py has a fuller one)."""

    def __init__(self, model: TinyLLM, fail_call: int) -> None:
        self.model, self.fail_call, self.calls = model, fail_call, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def forward_fused(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_call:
            raise RuntimeError("injected fault")
        return self.model.forward_fused(*args, **kwargs)


def steps_taken(model: Any) -> tuple[int, int | None, list[torch.Tensor]]:
    """Completed steps, the step_id right after a failed step (None without one), and every token."""
    sched = Scheduler(model, 6, 3, executor="fused")
    reqs = [make_request(f"r{i}", L, n, 8, seed=i) for i, (L, n) in enumerate([(5, 4), (2, 6), (7, 3)])]
    for req in reqs:
        sched.add_request(req)
    completed, after_fault = 0, None
    while sched.active:
        try:
            sched.step()
            completed += 1
        except RuntimeError:
            after_fault = sched.step_id
    return completed, after_fault, [t for r in reqs for t in r.generated_tokens]


def test_phase7_fault(answers: ModuleType) -> None:
    model = make_model(8)
    clean_steps, _, clean_tokens = steps_taken(model)
    faulty_steps, after_fault, faulty_tokens = steps_taken(FaultyModel(model, fail_call=2))
    assert after_fault is not None
    check(given(answers, "STEP_ID_AFTER_FAULT") == after_fault,
          "STEP_ID_AFTER_FAULT: a step whose compute raises writes nothing; is step_id written before or after "
          "the compute? (Scheduler.step and commit)")
    check(given(answers, "EXTRA_STEPS") == faulty_steps - clean_steps,
          "EXTRA_STEPS: the failed step changed nothing, so what does the next step() run?")
    assert all(torch.equal(a, b) for a, b in zip(clean_tokens, faulty_tokens, strict=True))


def append_wrong_dim() -> None:
    cache = DenseKVCache()
    cache.append(torch.ones(2, 4), torch.ones(2, 4))
    cache.append(torch.ones(1, 5), torch.ones(1, 5))


def duplicate_req_id() -> None:
    sched = Scheduler(make_model(4))
    sched.add_request(make_request("r", 3, 2, 4))
    sched.add_request(make_request("r", 3, 2, 4))


BAD_CALLS: dict[str, Callable[[], object]] = {
    "zero_budget": lambda: Scheduler(make_model(4), max_tokens_per_step=0),
    "negative_max_new_tokens": lambda: Request("r", torch.randn(3, 4), -1, DenseKVCache()),
    "append_wrong_dim": append_wrong_dim,
    "duplicate_req_id": duplicate_req_id,
}


def test_phase7_bad_inputs(answers: ModuleType) -> None:
    named = given(answers, "EXCEPTIONS")
    check(set(named) == set(BAD_CALLS), f"EXCEPTIONS: name one exception for each of {sorted(BAD_CALLS)}")
    for key, bad_call in BAD_CALLS.items():
        with pytest.raises(CBLabException) as info:
            bad_call()
        check(named[key] == type(info.value).__name__,
              f"EXCEPTIONS[{key!r}]: find the check that refuses this call (the constructor, add_request or "
              "append) and the class it raises; cb_lab/exceptions.py lists them")
