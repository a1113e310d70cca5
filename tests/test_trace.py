"""TracePlugin: one StepTrace per step, from the hooks alone, checked against the scheduler and by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_model, make_request

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.exceptions import ValidationError
from cb_lab.model.llama import LlamaModel
from cb_lab.model.llama_config import LlamaConfig
from cb_lab.model.llama_step import LlamaStepModel
from cb_lab.monitoring.trace import StepTrace, TracePlugin, load_trace, request_timeline
from cb_lab.plugins.base import PluginManager, SchedulerPlugin
from cb_lab.plugins.builtin import MetricsPlugin
from cb_lab.sampling import SamplingParams

DIM = 8


def traced(budget: int, chunk: int, *plugins: SchedulerPlugin, **knobs: Any) -> tuple[Scheduler, TracePlugin]:
    manager = PluginManager()
    for plugin in plugins:
        manager.register_scheduler_plugin(plugin)
    trace = TracePlugin()
    manager.register_scheduler_plugin(trace)
    return Scheduler(make_model(DIM), budget, chunk, plugins=manager, **knobs), trace


def run_checked(sched: Scheduler, trace: TracePlugin, arrivals: list[tuple[int, Request]]) -> None:
    """Like run_workload, but after every step the trace's queues must equal the scheduler's."""
    pending = sorted(arrivals, key=lambda pair: pair[0])
    now = 0
    while pending or sched.active:
        while pending and pending[0][0] <= now:
            sched.add_request(pending.pop(0)[1])
        if sched.step()["status"] == "completed":
            last = trace.steps[-1]
            assert last.waiting == tuple(r.req_id for r in sched.waiting)
            assert last.running == tuple(r.req_id for r in sched.running)
        now += 1


def hand_schedule() -> list[tuple[int, Request]]:
    # (arrival step, request): A prompt 6 / 2 tokens, B 3 / 3, C 2 / 2 (dense caches).
    return [(0, make_request("A", 6, 2, DIM)), (0, make_request("B", 3, 3, DIM)), (2, make_request("C", 2, 2, DIM))]


def test_hand_computed_trace() -> None:
    sched, trace = traced(4, 4)
    run_checked(sched, trace, hand_schedule())
    # Budget 4, chunk 4, decode first, then running prefills, then FCFS admissions:
    # step 0: A[0:4] uses the whole budget, B waits (budget)
    # step 1: A[4:6] (A's first token), B admitted with B[0:2]
    # step 2: C arrives; decode A (its 2nd token: done), B[2:3] (first token), C admitted with C[0:2]
    # step 3: decode B, C (C done);  step 4: decode B (done)
    s = trace.steps
    assert [t.step_id for t in s] == [0, 1, 2, 3, 4]
    assert [t.prefill for t in s] == [(("A", 0, 4),), (("A", 4, 2), ("B", 0, 2)), (("B", 2, 1), ("C", 0, 2)), (), ()]
    assert [t.decode for t in s] == [(), (), ("A",), ("B", "C"), ("B",)]
    assert [t.admitted for t in s] == [("A",), ("B",), ("C",), (), ()]
    assert [t.finished for t in s] == [(), (), ("A",), ("C",), ("B",)]
    assert [t.arrived for t in s] == [("A", "B"), (), ("C",), (), ()]
    assert s[0].skipped == (("B", "budget"),) and s[0].waiting == ("B",) and s[0].running == ("A",)
    assert [t.tokens_used for t in s] == [4, 4, 4, 2, 1]
    assert all(t.block_tables == () and t.pool_used_blocks is None and t.budget is None for t in s)
    assert {k: "".join(v) for k, v in trace.request_timeline().items()} == {
        "A": "PPD  ",
        "B": ".PPDD",
        "C": "  PD ",
    }


def pool_run(*plugins: SchedulerPlugin) -> tuple[Scheduler, TracePlugin, list[Request]]:
    """Two requests (prompt 2, 5 tokens: 6 rows = 3 blocks of 2 each) on a shared pool of only 4 blocks."""
    sched, trace = traced(4, 4, *plugins)
    pool = BlockPool(4, 2, DIM)
    reqs = [make_request(f"r{i}", 2, 5, DIM, PagedKVCache(2, pool=pool)) for i in range(2)]
    run_checked(sched, trace, [(0, r) for r in reqs])
    return sched, trace, reqs


def test_preemption_shows_x_then_waiting_then_prefill_again() -> None:
    _, trace, reqs = pool_run()
    # steps 0-2: both prefill, then decode; blocks used 2, 4, 4 (the pool is full).
    # step 3: r0's 5th row needs a block: the latest admitted (r1) is preempted, frees 2; r0 takes 1 -> 3 used.
    # step 4: r0's last token (done: its 3 blocks go back -> 0 used). r1 now needs room for a 5-row
    #         prefill (prompt + 3 tokens = 3 blocks) but at planning time only 1 was free: it waits.
    # step 5: r1 runs P[0:4] (2 blocks), step 6: P[4:5] (3 blocks, token 4), step 7: its last decode.
    timeline = {k: "".join(v) for k, v in trace.request_timeline().items()}
    assert timeline == {"r0": "PDDDD   ", "r1": "PDDx.PPD"}
    s = trace.steps
    assert s[3].preempted == ("r1",) and s[3].waiting == ("r1",) and s[3].running == ("r0",)
    assert s[4].skipped == (("r1", "no_blocks"),)
    assert [t.prefill for t in s[5:7]] == [(("r1", 0, 4),), (("r1", 4, 1),)]
    assert [t.pool_used_blocks for t in s] == [2, 4, 4, 3, 0, 2, 3, 0]
    assert {t.pool_num_blocks for t in s} == {4}
    assert reqs[1].num_preemptions == 1
    # Block tables after each step, of the requests that ran. The pool hands out the lowest id first,
    # then the most recently freed (a stack): r0 [0, 2], r1 [1, 3] after step 1; r1's preemption frees
    # 1, 3 and r0 takes 3; r0 finishing frees 0, 2, 3 and r1's new prefill takes 3, 2, then 0.
    assert [dict(t.block_tables) for t in s] == [
        {"r0": (0,), "r1": (1,)},
        {"r0": (0, 2), "r1": (1, 3)},
        {"r0": (0, 2), "r1": (1, 3)},
        {"r0": (0, 2, 3)},
        {"r0": ()},  # finished: a shared pool's blocks go back at once
        {"r1": (3, 2)},
        {"r1": (3, 2, 0)},
        {"r1": ()},
    ]


def test_json_round_trip_equals_the_original(tmp_path: Path) -> None:
    _, trace, _ = pool_run()
    path = tmp_path / "trace.json"
    text = trace.to_json(path)
    assert path.read_text() == text
    assert json.loads(text)["steps"][3]["preempted"] == ["r1"]
    loaded = TracePlugin.load_json(path)
    assert loaded == trace.steps and all(isinstance(t, StepTrace) for t in loaded)
    assert request_timeline(loaded) == trace.request_timeline()
    assert load_trace(path) == trace.steps
    (tmp_path / "other.json").write_text(json.dumps({"steps": []}))
    with pytest.raises(ValidationError, match="not a cb-lab trace"):
        load_trace(tmp_path / "other.json")


def test_budget_comes_from_the_stats_when_they_carry_it() -> None:
    class AddBudget(SchedulerPlugin):  # registered first: later plugins see the key in the same dict
        def after_step(self, stats: dict[str, Any]) -> None:
            stats["max_tokens_per_step"] = 4

    metrics = MetricsPlugin()
    sched, trace = traced(4, 4, AddBudget(), metrics)
    run_checked(sched, trace, hand_schedule())
    assert [t.budget for t in trace.steps] == [4] * 5
    assert [s.max_tokens_per_step for s in metrics.collector.steps] == [4] * 5
    assert metrics.get_summary()["run"]["budget_utilization"] == 15 / 20  # 4+4+4+2+1 tokens of 5 x 4
    sched, fixed = traced(4, 4)
    fixed.budget = 4  # or TracePlugin(budget=4)
    run_checked(sched, fixed, hand_schedule())
    assert [t.budget for t in fixed.steps] == [4] * 5


def test_zero_token_request_waits_one_step_and_finishes() -> None:
    sched, trace = traced(4, 4)
    run_checked(sched, trace, [(0, make_request("z", 3, 0, DIM)), (0, make_request("a", 2, 1, DIM))])
    assert set(trace.steps[0].finished) == {"z", "a"} and len(trace.steps) == 1
    assert {k: "".join(v) for k, v in trace.request_timeline().items()} == {"z": ".", "a": "P"}
    assert trace.steps[0].waiting == trace.steps[0].running == ()


def test_static_batching_padding_and_skip_reasons_are_traced() -> None:
    sched, trace = traced(8, 8, policy="static")
    arrivals = [(0, make_request(f"s{i}", 2, n, DIM)) for i, n in enumerate((1, 3))]
    arrivals.append((1, make_request("late", 2, 1, DIM)))
    run_checked(sched, trace, arrivals)
    # s0 finishes at its prefill (step 0); s1 decodes in steps 1-2 while s0's slot is padding;
    # "late" (arrived at step 1) waits for the whole batch: reason batch_running.
    assert [t.padding_tokens for t in trace.steps][:3] == [0, 1, 1]
    assert trace.steps[1].skipped == (("late", "batch_running"),)
    assert "".join(trace.request_timeline()["late"]) == " ..P"


def test_running_but_skipped_is_a_dash() -> None:
    sched, trace = traced(4, 4)
    for req_id in ("a", "b"):
        sched.add_request(make_request(req_id, 2, 5, DIM))
    sched.step()  # both prefill: a[0:2], b[0:2], a token each
    sched.max_tokens_per_step = 1  # one decode per step now: they take turns (round robin)
    sched.run_until_complete()
    timeline = {k: "".join(v) for k, v in trace.request_timeline().items()}
    assert timeline == {"a": "PD-D-D-D ", "b": "P-D-D-D-D"}
    assert all(t.skipped in ((("a", "budget"),), (("b", "budget"),)) for t in trace.steps[1:-1])


def test_prefix_hits_samples_and_copies_are_traced(tmp_path: Path) -> None:
    """n = 2 samples fork at the first token and run at once; a later copy of the prompt hits the cache."""
    model = LlamaStepModel(LlamaModel(LlamaConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                                  ffn_dim=16), seed=0))
    manager, trace = PluginManager(), TracePlugin()
    manager.register_scheduler_plugin(trace)
    sched = Scheduler(model, 16, 16, plugins=manager, enable_prefix_caching=True)
    pool = BlockPool(16, 2, model.kv_dim)
    prompt = torch.arange(7) % 32
    params = SamplingParams(max_tokens=3, temperature=1.0, seed=0, n=2)
    sched.add_request(Request("p", prompt, 3, PagedKVCache(2, pool=pool), sampling=params))
    sched.step()
    assert trace.steps[0].running == ("p", "p.1") == tuple(r.req_id for r in sched.running)
    sched.add_request(Request("q", prompt.clone(), 3, PagedKVCache(2, pool=pool)))
    sched.run_until_complete()
    hits = [(s.step_id, s.prefix_hits) for s in trace.steps if s.prefix_hits]
    assert hits == [(1, (("q", 6),))]  # 3 cached blocks: every row but the last
    assert sum(s.kv_copies for s in trace.steps) == 0  # p.1 holds rows 0..5, three full blocks: nothing to copy
    trace.to_json(tmp_path / "t.json")
    assert TracePlugin.load_json(tmp_path / "t.json") == trace.steps


def test_an_aborted_request_leaves_the_queues_at_the_next_step() -> None:
    """Scheduler.abort calls on_request_aborted; the next step's trace says who went, and its queues are the
    scheduler's."""
    sched, trace = traced(4, 4, max_num_seqs=1)
    for req_id in "ABC":
        sched.add_request(make_request(req_id, 3, 4, DIM))
    sched.step()  # A runs, B and C wait
    sched.abort("A")  # running
    sched.abort("C")  # waiting
    sched.step()
    last = trace.steps[-1]
    assert last.aborted == ("A", "C") and trace.steps[0].aborted == ()
    assert last.running == tuple(r.req_id for r in sched.running) == ("B",)
    assert last.waiting == tuple(r.req_id for r in sched.waiting) == ()
    assert StepTrace.from_dict(json.loads(json.dumps(last.to_dict()))) == last


def test_a_subclass_keeps_its_steps_elsewhere() -> None:
    """``record`` is where a step goes: a bounded window here, a live page in cb_lab.live."""

    class LastTwo(TracePlugin):
        def record(self, step: StepTrace) -> None:
            self.steps = [*self.steps[-1:], step]

    sched, reference = traced(4, 4)
    window = LastTwo()
    sched.plugins.register_scheduler_plugin(window)
    run_checked(sched, reference, hand_schedule())
    assert window.steps == reference.steps[-2:] and len(reference.steps) > 2
