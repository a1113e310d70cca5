"""Checks the phase 12 exercises (docs/learning_materials/phase12_static_vs_continuous.md) against cb-lab itself."""

from __future__ import annotations

from types import ModuleType

import pytest
from given import call, check, given

from cb_lab.serving import (
    DEFAULT_COMPARE,
    QUICK_WORKLOAD,
    batch_stats,
    compare,
    make_config,
    simulate,
)
from cb_lab.workload import generate_workload
from cb_lab.workload_io import RequestSpec

PHASE = "phase12"


def test_phase12_padding(answers: ModuleType) -> None:
    specs = [RequestSpec(f"r{i}", 0, 6, 11 if i == 0 else 1) for i in range(6)]  # (id, arrival, prompt, tokens)
    run = simulate(specs, make_config("static", max_num_seqs=6), dim=8)
    check(given(answers, "PADDING_B6_N11") == run.summary["padding_tokens"],
          "PADDING_B6_N11: a finished request keeps its slot until the batch's longest is done; count, step by "
          "step, the slots held by requests that are already finished")


@pytest.mark.parametrize("outputs, batch_size", [
    ([2, 9, 3, 3, 1, 12, 4, 2], 4), ([5, 5, 5, 5, 5, 5], 3), ([1, 30, 2], 2), ([7, 1, 1, 1, 1], 5), ([3, 1, 4], 1),
])
def test_phase12_bound(answers: ModuleType, outputs: list[int], batch_size: int) -> None:
    specs = [RequestSpec(f"r{i}", 0, 4, n) for i, n in enumerate(outputs)]
    config = make_config("static", max_num_seqs=batch_size, max_tokens_per_step=8 * batch_size, prefill_chunk_size=8)
    bound = batch_stats(simulate(specs, config, dim=8))["bound"]
    check(call(answers, "speedup_bound", outputs, batch_size) == pytest.approx(bound),
          f"speedup_bound({outputs}, {batch_size}): the batches are consecutive runs of batch_size requests (the "
          "last may be shorter); the mean of each batch's longest output, over the mean output")


def test_phase12_policies(answers: ModuleType) -> None:
    lowest, most = given(answers, "LOWEST_TTFT_P50"), given(answers, "MOST_TOKENS_PER_STEP")
    runs = compare(generate_workload(QUICK_WORKLOAD), DEFAULT_COMPARE)  # what `cb_lab compare --quick` runs
    check(lowest == min(runs, key=lambda r: r.summary["ttft_p50_steps"]).name,
          "LOWEST_TTFT_P50: the TTFT p50 column of python -m cb_lab compare --quick (a preset name)")
    check(most == max(runs, key=lambda r: r.summary["tokens_per_step"]).name,
          "MOST_TOKENS_PER_STEP: the tok/step column of the same table")


def test_phase12_slots(answers: ModuleType) -> None:
    answer = given(answers, "BOUND_SLOTS_8")
    config = make_config("static", max_num_seqs=8, max_tokens_per_step=32 * 8)  # the demo's engine for --slots 8
    bound = batch_stats(simulate(generate_workload(QUICK_WORKLOAD), config))["bound"]
    check(answer == pytest.approx(bound, abs=0.005),
          "BOUND_SLOTS_8: the 'continuous can reach ... = X' line of python -m demos.demo_static_vs_continuous "
          "--quick --slots 8")
