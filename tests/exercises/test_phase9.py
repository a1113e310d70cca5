"""Checks the phase 9 exercises (docs/learning_materials/phase9_fused_step.md) against cb-lab itself."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
import torch
from given import call, check, given
from helpers import TOL, make_model, make_request

from cb_lab.core.executor import SplitExecutor
from cb_lab.core.scheduler import Scheduler
from cb_lab.model.tiny_llm import TinyLLM

PHASE = "phase9"


def calls_of_one_step(executor: str, num_decode: int, chunk_rows: list[int]) -> int:
    """Model calls of a step with ``num_decode`` decode tokens and one fresh chunk per entry of ``chunk_rows``."""
    sched = Scheduler(make_model(8), max_tokens_per_step=2 * num_decode, prefill_chunk_size=4, executor=executor)
    for i in range(num_decode):
        sched.add_request(make_request(f"d{i}", 2, 4, 8))
    sched.step()  # every 2-row prompt prefilled: they decode from the next step on
    sched.max_tokens_per_step = num_decode + sum(chunk_rows)  # room for exactly the step we want
    for i, rows in enumerate(chunk_rows):
        sched.add_request(make_request(f"p{i}", rows, 2, 8))
    plan = sched.schedule()
    assert (plan.num_decode_tokens, [c.length for c in plan.prefill]) == (num_decode, chunk_rows)
    before: int = sched.executor.num_model_calls
    sched.step()
    after: int = sched.executor.num_model_calls
    return after - before


def test_phase9_calls(answers: ModuleType) -> None:
    check(given(answers, "CALLS_SPLIT") == calls_of_one_step("split", 5, [4, 4]),
          "CALLS_SPLIT: the split executor runs all of a step's prefill chunks in one call; how many calls do "
          "its decode tokens take?")
    check(given(answers, "CALLS_FUSED") == calls_of_one_step("fused", 5, [4, 4]),
          "CALLS_FUSED: the fused executor puts every row of the step in one flat batch")


def test_phase9_weight_bytes(answers: ModuleType) -> None:
    model = TinyLLM(1024)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # the four [D, D] matrices
    for name, executor in (("WEIGHT_BYTES_SPLIT", "split"), ("WEIGHT_BYTES_FUSED", "fused")):
        calls = calls_of_one_step(executor, 32, [])  # the calls do not depend on dim
        check(given(answers, name) == calls * weight_bytes,
              f"{name}: the model calls of that step x the bytes of the four [1024, 1024] float32 matrices "
              "(4 bytes a value), which every call reads once")


def test_phase9_split_output(answers: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(8)
    raw: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    forward_fused = model.forward_fused

    def spy(*args: Any, output_rows: torch.Tensor | None = None, **kwargs: Any
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raw.append(forward_fused(*args, **kwargs))  # keep the fused forward's whole output, every row's
        out, k, v = raw[-1]
        return (out if output_rows is None else out[output_rows]), k, v  # the executor asks only for sampled rows

    monkeypatch.setattr(model, "forward_fused", spy)
    sched = Scheduler(model, max_tokens_per_step=16, prefill_chunk_size=4)  # the fused executor
    for i in range(3):
        sched.add_request(make_request(f"d{i}", 2, 5, 8))
    sched.step()
    sched.add_request(make_request("p", 6, 2, 8))  # chunks 0:4, then 4:6 on top of its cached prefix
    sched.add_request(make_request("q", 3, 2, 8))
    for _ in range(2):
        plan = sched.schedule()
        split = SplitExecutor(model).run(plan)  # the same step the split way (it writes nothing)
        raw.clear()
        sched.step()
        out, k, _ = raw[0]
        lengths = [c.length for c in plan.prefill]
        decode_out, chunk_out = call(answers, "split_fused_output", out, len(plan.decode), lengths)
        decode_k, chunk_k = call(answers, "split_fused_output", k, len(plan.decode), lengths)
        layout = "the fused batch is the decode rows first, then each prefill chunk's rows, in plan order"
        check(same(decode_out, torch.stack([o.token for o in split.decode])), f"split_fused_output: {layout}")
        check(same(decode_k, torch.cat([o.k for o in split.decode])), f"split_fused_output: {layout}")
        check(len(chunk_out) == len(chunk_k) == len(plan.prefill), "split_fused_output: one tensor per prefill chunk")
        for chunk, rows_out, rows_k, want in zip(plan.prefill, chunk_out, chunk_k, split.prefill):
            check(same(rows_k, want.k), f"split_fused_output: a chunk's rows; {layout}")
            if chunk.completes_prompt:  # its last row is the request's first token
                assert want.token is not None
                check(same(rows_out[-1], want.token), f"split_fused_output: a chunk's rows; {layout}")


def same(got: torch.Tensor, want: torch.Tensor) -> bool:
    return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got, want, **TOL)
