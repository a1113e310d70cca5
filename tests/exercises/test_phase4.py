"""Checks the phase 4 exercises (docs/learning_materials/phase4_timeline.md) against cb-lab itself.

Each check replays the workload of ``python -m demos.demo_scheduler_timeline`` (its arrivals
and lengths, ``make_workload(14, 0)``) through the scheduler, the way the demo steps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import pytest
from given import check, given
from helpers import make_model, make_request

from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from demos.demo_scheduler_timeline import make_workload

PHASE = "phase4"


@dataclass(frozen=True)
class Run:
    steps: int
    utilisation: float  # tokens run / (steps * budget)
    first_token_step: dict[str, int]
    ttft: dict[str, int]  # steps from arrival to first token, counting the arrival step


def replay(budget: int = 8, chunk: int = 4) -> Run:
    workload = make_workload(14, 0)
    sched = Scheduler(make_model(8), budget, chunk)
    requests: dict[str, Request] = {}
    first: dict[str, int] = {}
    tokens = t = 0
    while len(requests) < len(workload) or sched.active:
        for a in workload:
            if a.step == t:  # added just before step t runs
                requests[a.req_id] = make_request(a.req_id, a.prompt_len, a.max_new_tokens, 8)
                sched.add_request(requests[a.req_id])
        tokens += sched.step()["total_tokens"]
        first |= {r: t for r, req in requests.items() if req.generated_tokens and r not in first}
        t += 1
    ttft = {a.req_id: first[a.req_id] - a.step + 1 for a in workload}
    return Run(t, tokens / (t * budget), first, ttft)


def test_phase4_ttft(answers: ModuleType) -> None:
    run = replay()
    check(given(answers, "K_FIRST_TOKEN_STEP") == run.first_token_step["k"],
          "K_FIRST_TOKEN_STEP: k's first token comes out of its last prompt chunk: the step of k's last P")
    check(given(answers, "K_TTFT_STEPS") == run.ttft["k"],
          "K_TTFT_STEPS: from k's arrival step to its first-token step, counting both")


def test_phase4_budget(answers: ModuleType) -> None:
    steps, util, ttft = (given(answers, n) for n in ("STEPS_BY_BUDGET", "UTILISATION_BY_BUDGET", "MEAN_TTFT_BY_BUDGET"))
    for answer in (steps, util, ttft):
        check(set(answer) == {4, 8, 16}, f"one value for each budget 4, 8 and 16, got keys {sorted(answer)}")
    for budget in (4, 8, 16):
        run = replay(budget)
        where = f"the last line of python -m demos.demo_scheduler_timeline --budget {budget}"
        check(steps[budget] == run.steps, f"STEPS_BY_BUDGET[{budget}]: the steps figure of {where}")
        check(util[budget] == pytest.approx(100 * run.utilisation, abs=0.5),
              f"UTILISATION_BY_BUDGET[{budget}]: the mean budget utilisation (a percent) of {where}")
        mean_ttft = sum(run.ttft.values()) / len(run.ttft)
        check(ttft[budget] == pytest.approx(mean_ttft, abs=0.005),
              f"MEAN_TTFT_BY_BUDGET[{budget}]: the mean steps to first token of {where}")


def test_phase4_chunk(answers: ModuleType) -> None:
    base, big = replay(chunk=4), replay(chunk=16)
    earlier = [r for r in base.ttft if big.ttft[r] < base.ttft[r]]
    check(sorted(given(answers, "EARLIER_WITH_CHUNK_16")) == sorted(earlier),
          "EARLIER_WITH_CHUNK_16: compare each request's steps from arrival to first token (its row of the "
          "timeline) with --chunk 16 and with the default; keep the ones that drop")
    check(given(answers, "STEPS_WITH_CHUNK_16") == big.steps,
          "STEPS_WITH_CHUNK_16: the steps figure on the last line of the --chunk 16 run")
