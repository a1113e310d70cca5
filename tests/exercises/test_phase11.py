"""Checks the phase 11 exercises (docs/learning_materials/phase11_serving.md) against cb-lab itself."""

from __future__ import annotations

from types import ModuleType

from given import check, given
from helpers import make_model, make_request

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.scheduler import Scheduler
from cb_lab.monitoring.metrics import MetricsCollector
from cb_lab.plugins.base import PluginManager
from cb_lab.plugins.builtin import MetricsPlugin
from demos import demo_admission_preemption
from demos._common import make_model as demo_model

PHASE = "phase11"


def skipped_per_step(max_num_seqs: int, num_steps: int) -> list[list[tuple[str, str]]]:
    pool = BlockPool(5, 4, 8)
    sched = Scheduler(make_model(8), max_tokens_per_step=8, prefill_chunk_size=4, max_num_seqs=max_num_seqs)
    for req_id, prompt_len, max_new in [("a", 8, 4), ("b", 6, 3), ("c", 9, 2), ("d", 1, 2)]:
        sched.add_request(make_request(req_id, prompt_len, max_new, 8, PagedKVCache(4, pool=pool)))
    skipped = []
    for _ in range(num_steps):
        skipped.append(list(sched.schedule().skipped))  # schedule() is pure: step() runs this plan
        sched.step()
    return skipped


def test_phase11_skip(answers: ModuleType) -> None:
    step0, step1 = skipped_per_step(3, 2)
    rules = ("admission asks max_num_seqs, then the budget, then the free blocks (the whole prefill must fit), "
             "and a request behind one that waits waits for the same reason")
    check([tuple(pair) for pair in given(answers, "SKIPPED_STEP_0")] == step0, f"SKIPPED_STEP_0: {rules}")
    check([tuple(pair) for pair in given(answers, "SKIPPED_STEP_1")] == step1,
          f"SKIPPED_STEP_1: step 0's requests now run; {rules}")
    reason_c = dict(skipped_per_step(2, 1)[0]).get("c")
    check(given(answers, "C_REASON_WITH_2_SEQS") == reason_c, f"C_REASON_WITH_2_SEQS: {rules}")


def test_phase11_latency(answers: ModuleType) -> None:
    plugins = PluginManager()
    metrics = MetricsPlugin(MetricsCollector(enable_memory_profiling=False))
    plugins.register_scheduler_plugin(metrics)
    sched = Scheduler(make_model(8), max_tokens_per_step=4, prefill_chunk_size=4, plugins=plugins)
    sched.add_request(make_request("a", 6, 3, 8))
    sched.step()
    sched.add_request(make_request("b", 3, 2, 8))
    sched.run_until_complete()
    a, b = metrics.collector.requests["a"], metrics.collector.requests["b"]
    counts = "count from the arrival step to the step of the first (TTFT) or last (e2e) token, both included"
    check(given(answers, "B_TTFT_STEPS") == b.ttft_steps, f"B_TTFT_STEPS: write out the plans step by step; {counts}")
    check(given(answers, "B_E2E_STEPS") == b.e2e_steps, f"B_E2E_STEPS: {counts}")
    check(given(answers, "A_E2E_STEPS") == a.e2e_steps, f"A_E2E_STEPS: does b's arrival slow a down? {counts}")


def test_phase11_reprefill(answers: ModuleType) -> None:
    req = make_request("a", 7, 6, 8)
    sched = Scheduler(make_model(8), max_tokens_per_step=16, prefill_chunk_size=16, preempt_every=4)
    sched.add_request(req)
    rows: list[int] = []
    tokens_then = None
    while sched.active:
        plan = sched.schedule()
        if req in plan.preempted:
            tokens_then, rows = len(req.generated_tokens), []
        rows += [c.length for c in plan.prefill]
        sched.step()
    assert tokens_then == 3 and req.num_preemptions == 1, "the checker's forced preemption came after 3 tokens"
    check(given(answers, "REPREFILL_ROWS") == sum(rows),
          "REPREFILL_ROWS: a preempted request keeps its tokens but drops its K/V; which rows must it run again, "
          "and is its last token among them?")


def test_phase11_min_blocks(answers: ModuleType) -> None:
    d = demo_admission_preemption
    need = max(-(-(n + k - 1) // d.BLOCK_SIZE) for _, _, n, k in d.QUICK_REQUESTS)  # the pool each request needs alone
    smallest = next(n for n in range(need, 64)
                    if d.run(demo_model(d.DIM, 0), d.QUICK_REQUESTS, n, 3)[0].num_preemptions == 0)
    check(given(answers, "MIN_BLOCKS_NO_PREEMPTION") == smallest,
          "MIN_BLOCKS_NO_PREEMPTION: lower --num-blocks one at a time and read the 'preemptions:' line")
