"""Checks the phase 0 exercises (docs/learning_materials/phase0_setup.md) against cb-lab itself."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from given import check, given

from cb_lab.__main__ import parse_args, run
from cb_lab.core.request import Request
from cb_lab.plugins.base import PluginManager

PHASE = "phase0"


def main_job_quick() -> tuple[list[Request], list[dict[str, Any]]]:
    """The workload of ``python -m cb_lab --quick``, run the way the command runs it."""
    _, requests, _, history = run(parse_args(["--quick"]), PluginManager())
    return requests, [s for s in history if s["status"] == "completed"]


def test_phase0_read_output(answers: ModuleType) -> None:
    _, steps = main_job_quick()
    check(given(answers, "QUICK_STEPS") == len(steps),
          "QUICK_STEPS: count the step lines of python -m cb_lab --quick (the summary line says it too)")
    check(given(answers, "QUICK_PREFILL_TOKENS") == sum(s["prefill_tokens"] for s in steps),
          "QUICK_PREFILL_TOKENS: the P's of every step, summed; the summary line splits its tokens in two")
    check(given(answers, "QUICK_DECODE_TOKENS") == sum(s["decode_tokens"] for s in steps),
          "QUICK_DECODE_TOKENS: the D's of every step, summed; the summary line splits its tokens in two")


def test_phase0_generated(answers: ModuleType) -> None:
    requests, _ = main_job_quick()
    check(given(answers, "QUICK_GENERATED_TOKENS") == sum(len(r.generated_tokens) for r in requests),
          "QUICK_GENERATED_TOKENS: every decode token is a generated token, but not every generated token comes "
          "from a decode: where does a request's first token come from?")
