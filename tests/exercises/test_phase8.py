"""Checks the phase 8 exercises (docs/learning_materials/phase8_exploration.md) against cb-lab itself.

Each check runs the main job's workload through ``cb_lab.__main__.run``, exactly as
``python -m cb_lab FLAGS`` does, without printing.
"""

from __future__ import annotations

from functools import cache
from types import ModuleType
from typing import Any

import torch
from given import check, given
from helpers import TOL

from cb_lab.__main__ import parse_args, run
from cb_lab.core.request import Request
from cb_lab.plugins.base import PluginManager

PHASE = "phase8"


@cache
def main_job(*flags: str) -> tuple[list[Request], list[dict[str, Any]]]:
    """The requests and the completed steps of ``python -m cb_lab FLAGS``."""
    with torch.random.fork_rng(devices=[]):  # run() seeds torch's global RNG; leave it as it was
        _, requests, _, history = run(parse_args(list(flags)), PluginManager())
    return requests, [s for s in history if s["status"] == "completed"]  # the steps the summary counts


def test_phase8_more_requests(answers: ModuleType) -> None:
    got_prefill, got_decode = given(answers, "PREFILL_TOKENS_20"), given(answers, "DECODE_TOKENS_20")
    requests, steps = main_job("--requests", "20")
    prefill, decode = sum(s["prefill_tokens"] for s in steps), sum(s["decode_tokens"] for s in steps)
    assert prefill == sum(r.prompt_len for r in requests)  # every prompt row runs once
    assert decode == sum(r.max_new_tokens for r in requests) - len(requests)  # token 1 comes from the prefill
    check(got_prefill == prefill, "PREFILL_TOKENS_20: the prefill tokens on the summary line of "
          "python -m cb_lab --requests 20 (every prompt row runs once)")
    check(got_decode == decode, "DECODE_TOKENS_20: the decode tokens on the same summary line")


def test_phase8_budget(answers: ModuleType) -> None:
    check(given(answers, "STEPS_BUDGET_8") == len(main_job()[1]),
          "STEPS_BUDGET_8: the steps figure on the summary line of python -m cb_lab (without --quick)")
    check(given(answers, "STEPS_BUDGET_4") == len(main_job("--budget", "4")[1]),
          "STEPS_BUDGET_4: the steps figure of python -m cb_lab --budget 4")


def test_phase8_tanh(answers: ModuleType) -> None:
    got_steps, got_first = given(answers, "STEPS_WITH_TANH"), given(answers, "FIRST_TANH_TOKEN_THAT_DIFFERS")
    plain, _ = main_job()
    sampled, steps = main_job("--tanh")
    check(got_steps == len(steps), "STEPS_WITH_TANH: the steps figure of python -m cb_lab --tanh; does a "
          "sampler change the schedule?")
    first_differs = set()
    for a, b in zip(plain, sampled, strict=True):
        pairs = zip(a.generated_tokens, b.generated_tokens, strict=True)
        same = [torch.allclose(torch.tanh(x), y, **TOL) for x, y in pairs]
        if not all(same):
            first_differs.add(same.index(False) + 1)  # 1-based: token 1, token 2, ...
    assert len(first_differs) == 1, f"the first differing token depends on the request: {sorted(first_differs)}"
    check(got_first == first_differs.pop(),
          "FIRST_TANH_TOKEN_THAT_DIFFERS: tanh is applied to every output row before it is recorded AND fed "
          "back; which token is the first computed from a tanh-ed input?")
