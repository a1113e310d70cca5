"""Plugins are really called: every hook, the expected number of times, with real data."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import assert_oracle, make_model, make_request

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import BaseKVCache, PagedKVCache
from cb_lab.core.plan import StepPlan
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.exceptions import ConfigurationError, ValidationError
from cb_lab.plugins.base import AttentionPlugin, CachePlugin, PluginManager, SchedulerPlugin
from cb_lab.plugins.builtin import (
    AttentionVisualizationPlugin,
    CacheCompressionPlugin,
    LoggingPlugin,
    MetricsPlugin,
)

SHAPES = [(5, 4), (2, 6), (7, 1), (3, 0)]  # (prompt_len, max_new_tokens)


class CountScheduler(SchedulerPlugin):
    def __init__(self) -> None:
        self.plans: list[StepPlan] = []
        self.stats: list[dict[str, Any]] = []
        self.completed: list[str] = []
        self.aborted: list[str] = []
        self.added: list[tuple[str, int]] = []

    def on_request_added(self, request: Request, step_id: int) -> None:
        self.added.append((request.req_id, step_id))

    def before_step(self, plan: StepPlan) -> None:
        self.plans.append(plan)

    def after_step(self, stats: dict[str, Any]) -> None:
        self.stats.append(stats)

    def on_request_completion(self, request: Request) -> None:
        self.completed.append(request.req_id)

    def on_request_aborted(self, request: Request) -> None:
        self.aborted.append(request.req_id)


class CountAttention(AttentionPlugin):
    def __init__(self) -> None:
        self.calls: list[tuple[str, torch.Tensor]] = []

    def on_attention(self, phase: str, weights: torch.Tensor) -> None:
        self.calls.append((phase, weights))


class CountCache(CachePlugin):
    def __init__(self) -> None:
        self.before: list[int] = []
        self.after: list[int] = []
        self.nbytes: list[int] = []

    def before_append(
        self, cache: BaseKVCache, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.before.append(k_new.shape[0])
        return k_new, v_new

    def after_append(self, cache: BaseKVCache, num_rows: int, nbytes: int) -> None:
        self.after.append(num_rows)
        self.nbytes.append(nbytes)


def run(
    manager: PluginManager, cache: str = "dense", dim: int = 8, executor: str = "fused"
) -> tuple[Any, list[Request], list[dict[str, Any]]]:
    model = make_model(dim)
    sched = Scheduler(model, 6, 3, plugins=manager, executor=executor)
    reqs = [make_request(f"r{i}", L, n, dim, cache, 2) for i, (L, n) in enumerate(SHAPES)]
    for r in reqs:
        sched.add_request(r)
    return model, reqs, sched.run_until_complete()


def test_an_abort_calls_on_request_aborted_at_once_and_a_stop_counts_as_completed() -> None:
    manager, counts = PluginManager(), CountScheduler()
    manager.register_scheduler_plugin(counts)
    sched = Scheduler(make_model(8), 6, 3, plugins=manager)
    for i, (L, n) in enumerate(SHAPES[:3]):
        sched.add_request(make_request(f"r{i}", L, n, 8))
    sched.step()
    sched.abort("r0")
    assert (counts.aborted, counts.completed) == (["r0"], [])  # between steps, before any next step
    sched.finish_request("r1", "stop")
    assert (counts.aborted, counts.completed) == (["r0"], ["r1"])


@pytest.mark.parametrize("executor", ["fused", "split"])
@pytest.mark.parametrize("cache", ["dense", "paged"])
def test_every_hook_is_called_the_expected_number_of_times(cache: str, executor: str) -> None:
    manager = PluginManager()
    sched_p, attn_p, cache_p = CountScheduler(), CountAttention(), CountCache()
    manager.register_scheduler_plugin(sched_p)
    manager.register_attention_plugin(attn_p)
    manager.register_cache_plugin(cache_p)
    model, reqs, history = run(manager, cache, executor=executor)

    assert len(sched_p.plans) == len(sched_p.stats) == len(history)
    assert sched_p.stats == history
    assert sched_p.added == [(r.req_id, 0) for r in reqs]  # each once, in order, before step 0
    assert sorted(sched_p.completed) == sorted(r.req_id for r in reqs)  # each exactly once, zero-token one too
    assert sched_p.aborted == []
    prefill_steps = sum(1 for p in sched_p.plans if p.prefill)
    decodes = sum(p.num_decode_tokens for p in sched_p.plans)
    phases = [phase for phase, _ in attn_p.calls]
    # fused: one batched decode attention per step with decodes; split: one per decode token
    decode_calls = sum(1 for p in sched_p.plans if p.decode) if executor == "fused" else decodes
    assert phases.count("prefill") == prefill_steps and phases.count("decode") == decode_calls
    assert sum(w.shape[0] for phase, w in attn_p.calls if phase == "decode") == decodes
    for _, weights in attn_p.calls:
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[0]))
    chunks = [ch.length for p in sched_p.plans for ch in p.prefill]
    assert cache_p.before == cache_p.after
    assert sorted(cache_p.before) == sorted(chunks + [1] * decodes)
    assert sum(cache_p.after) == sum(len(r.kv_cache) for r in reqs)
    assert cache_p.nbytes == [2 * n * 8 * 4 for n in cache_p.after]  # K and V rows of dim 8, float32
    for r in reqs:
        assert_oracle(model, r)


def test_prefill_attention_weights_are_zero_across_requests() -> None:
    manager = PluginManager()
    attn_p, sched_p = CountAttention(), CountScheduler()
    manager.register_attention_plugin(attn_p)
    manager.register_scheduler_plugin(sched_p)
    run(manager)
    phase, weights = attn_p.calls[0]
    plan = sched_p.plans[0]
    assert phase == "prefill" and all(ch.start == 0 for ch in plan.prefill)
    owner = torch.repeat_interleave(torch.arange(len(plan.prefill)), torch.tensor([c.length for c in plan.prefill]))
    other = owner[:, None] != owner[None, :]
    assert bool((weights[other] == 0).all()) and bool(weights[~other].sum() > 0)


def test_a_hook_fault_before_compute_changes_nothing() -> None:
    class Boom(SchedulerPlugin):
        def before_step(self, plan: StepPlan) -> None:
            raise RuntimeError("boom")

    manager = PluginManager()
    manager.register_scheduler_plugin(Boom())
    sched = Scheduler(make_model(8), 6, 3, plugins=manager)
    req = make_request("a", 4, 2, 8)
    sched.add_request(req)
    with pytest.raises(RuntimeError, match="boom"):
        sched.step()
    assert (req.prefill_pos, len(req.kv_cache), sched.step_id) == (0, 0, 0)


def test_a_hook_that_refuses_a_request_leaves_it_out_and_the_others_running() -> None:
    class Refuse(SchedulerPlugin):
        def on_request_added(self, request: Request, step_id: int) -> None:
            if request.req_id == "bad":
                raise ValueError(f"refused {request.req_id} at step {step_id}")

    manager = PluginManager()
    manager.register_scheduler_plugin(Refuse())
    model = make_model(8)
    sched = Scheduler(model, 6, 3, plugins=manager)
    good = make_request("good", 4, 3, 8)
    sched.add_request(good)
    sched.step()
    with pytest.raises(ValueError, match="refused bad at step 1"):
        sched.add_request(make_request("bad", 2, 2, 8))
    assert [r.req_id for r in sched.active] == ["good"]
    sched.run_until_complete()
    assert_oracle(model, good)


def test_metrics_plugin_needs_no_manual_calls() -> None:
    manager = PluginManager()
    metrics = MetricsPlugin()
    manager.register_scheduler_plugin(metrics)
    _, reqs, history = run(manager)
    summary = metrics.get_summary()
    assert summary["steps"]["total_steps"] == len(history)
    assert summary["steps"]["total_tokens_processed"] == sum(s["total_tokens"] for s in history)
    assert summary["requests"]["completed_requests"] == len(reqs)
    for r in reqs:
        tracked = metrics.collector.requests[r.req_id]
        assert tracked.is_finished and tracked.decode_tokens == len(r.generated_tokens)
        assert tracked.prefill_tokens == r.prefill_pos


def test_logging_plugin_logs_each_step_at_its_level(caplog: pytest.LogCaptureFixture) -> None:
    manager = PluginManager()
    manager.register_scheduler_plugin(LoggingPlugin("DEBUG"))
    manager.set_plugin_config("LoggingPlugin", {"log_level": "warning"})
    assert manager.get_plugin_config("LoggingPlugin") == {"log_level": "WARNING"}
    with caplog.at_level(logging.WARNING, logger="cb_lab.plugins.builtin"):
        _, reqs, history = run(manager)
    messages = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert sum(m.startswith("step ") and ": decode [" in m for m in messages) == len(history)
    assert sum(" done: " in m for m in messages) == len(history)
    assert sum(m.startswith("finished Request(") for m in messages) == len(reqs)


@pytest.mark.parametrize(("ratio", "dtype", "per_value"), [(0.5, torch.float16, 2), (0.25, torch.float8_e4m3fn, 1)])
@pytest.mark.parametrize("cache", ["dense", "paged"])
def test_compression_really_shrinks_the_cache(ratio: float, dtype: torch.dtype, per_value: int, cache: str) -> None:
    _, plain, _ = run(PluginManager(), cache)
    manager = PluginManager()
    compression = CacheCompressionPlugin(ratio)
    manager.register_cache_plugin(compression)
    _, squeezed, _ = run(manager, cache)
    rows = sum(len(r.kv_cache) for r in squeezed)
    report = compression.report()
    assert report["bytes_original"] == rows * 8 * 2 * 4  # dim 8, K and V, float32
    assert report["bytes_stored"] == rows * 8 * 2 * per_value
    assert report["achieved_ratio"] == per_value / 4 and compression.bytes_saved > 0
    assert sum(r.kv_cache.nbytes for r in squeezed) == report["bytes_stored"]
    assert sum(r.kv_cache.nbytes for r in plain) == report["bytes_original"]
    assert all(r.kv_cache.get_kv()[0].dtype == dtype for r in squeezed if len(r.kv_cache))
    error = compression.output_error(plain, squeezed)
    assert 0 < error < (0.05 if dtype == torch.float16 else 2.0)
    assert 0 < report["max_kv_error"] < (0.01 if dtype == torch.float16 else 0.5)


def test_compression_ratio_one_changes_nothing() -> None:
    _, plain, _ = run(PluginManager())
    manager = PluginManager()
    compression = CacheCompressionPlugin(1.0)
    manager.register_cache_plugin(compression)
    _, same, _ = run(manager)
    assert compression.output_error(plain, same) == 0.0 and compression.bytes_saved == 0


def test_compression_output_error_needs_the_same_requests() -> None:
    _, plain, _ = run(PluginManager())
    with pytest.raises(ValidationError, match="req_ids differ"):
        CacheCompressionPlugin.output_error(plain, plain[:2])


def test_attention_visualization_writes_what_it_recorded(tmp_path: Path) -> None:
    manager = PluginManager()
    viz = AttentionVisualizationPlugin(str(tmp_path / "viz"), max_records=5)
    manager.register_attention_plugin(viz)
    run(manager)
    assert len(viz.records) == 5
    paths = viz.save()
    npys = sorted(p for p in paths if p.suffix == ".npy")
    pngs = sorted(p for p in paths if p.suffix == ".png")
    assert len(npys) == 5 and len(pngs) == 5 and all(p.stat().st_size > 0 for p in pngs)
    for path, (phase, weights) in zip(npys, viz.records):
        assert path.name.endswith(f"_{phase}.npy")
        np.testing.assert_array_equal(np.load(path), weights)
        np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)


def test_attention_visualization_without_matplotlib_writes_arrays_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    manager = PluginManager()
    viz = AttentionVisualizationPlugin(str(tmp_path / "viz"), max_records=3)
    manager.register_attention_plugin(viz)
    run(manager)
    paths = viz.save()
    assert [p.suffix for p in paths] == [".npy"] * 3 and sorted(p.name for p in (tmp_path / "viz").iterdir()) == sorted(
        p.name for p in paths)
    for path, (_, weights) in zip(sorted(paths), viz.records):
        np.testing.assert_array_equal(np.load(path), weights)


def test_plugin_manager_registry_and_configs() -> None:
    manager = PluginManager()
    manager.register_scheduler_plugin(LoggingPlugin(), {"log_level": "ERROR"})
    manager.register_scheduler_plugin(MetricsPlugin())
    manager.register_cache_plugin(CacheCompressionPlugin(0.7))
    manager.register_attention_plugin(AttentionVisualizationPlugin("v"))
    assert manager.list_plugins() == {
        "scheduler": ["LoggingPlugin", "MetricsPlugin"],
        "attention": ["AttentionVisualizationPlugin"],
        "cache": ["CacheCompressionPlugin"],
    }
    assert manager.get_plugin_config("LoggingPlugin") == {"log_level": "ERROR"}
    assert manager.get_plugin_config("MetricsPlugin") == {}
    manager.set_plugin_config("CacheCompressionPlugin", {"compression_ratio": 0.3})
    compression = manager.cache_plugins[0]
    assert isinstance(compression, CacheCompressionPlugin) and compression.storage_dtype == torch.float8_e4m3fn
    manager.set_plugin_config("AttentionVisualizationPlugin", {"max_records": 2})
    assert manager.get_plugin_config("AttentionVisualizationPlugin") == {"save_dir": "v", "max_records": 2}
    for bad in ({"compression_ratio": 0.1}, {"compression_ratio": True}, {"ratio": 0.5}):
        with pytest.raises(ConfigurationError):
            manager.set_plugin_config("CacheCompressionPlugin", bad)
    with pytest.raises(ConfigurationError, match="'TRACE'"):
        LoggingPlugin("TRACE")
    for bad_viz in ({"save_dir": ""}, {"max_records": 0}):
        with pytest.raises(ConfigurationError):
            manager.set_plugin_config("AttentionVisualizationPlugin", bad_viz)


@pytest.mark.parametrize(("pool_dtype", "per_value"), [(torch.float32, 4), (torch.float16, 2)])
def test_compression_reports_what_a_shared_pool_really_stores(pool_dtype: torch.dtype, per_value: int) -> None:
    manager = PluginManager()
    compression = CacheCompressionPlugin(0.5)
    manager.register_cache_plugin(compression)
    pool = BlockPool(32, 2, 8, dtype=pool_dtype)
    sched = Scheduler(make_model(8), 6, 3, plugins=manager)
    reqs = [make_request(f"r{i}", L, n, 8, PagedKVCache(2, pool=pool)) for i, (L, n) in enumerate(SHAPES)]
    for r in reqs:
        sched.add_request(r)
    sched.run_until_complete()
    rows = sum(r.prompt_len + r.max_new_tokens - 1 for r in reqs if r.max_new_tokens)
    assert compression.report()["bytes_original"] == rows * 8 * 2 * 4
    assert compression.report()["bytes_stored"] == rows * 8 * 2 * per_value


# --- MetricsPlugin: latency in steps, computed by hand --------------------------------------


def run_hand_schedule() -> MetricsPlugin:
    """Budget 4, chunk 4, decode first; A (prompt 6, 2 tokens) and B (3, 3) arrive at step 0, C (2, 2) at step 2.

    The collector's clock reads the scheduler's step_id, so its "seconds" are steps too: an arrival
    at step s reads s, a step's first schedule reads s (before_step), its tokens and finishes read
    s + 1 (the commit has moved step_id on). Then every latency in seconds equals the one in steps.
    """
    from cb_lab.monitoring.metrics import MetricsCollector
    from cb_lab.workload import run_workload

    holder: list[Scheduler] = []
    manager = PluginManager()
    metrics = MetricsPlugin(MetricsCollector(enable_memory_profiling=False, clock=lambda: float(holder[0].step_id)))
    manager.register_scheduler_plugin(metrics)
    holder.append(Scheduler(make_model(8), 4, 4, plugins=manager))
    arrivals = [(0, make_request("A", 6, 2, 8)), (0, make_request("B", 3, 3, 8)), (2, make_request("C", 2, 2, 8))]
    history = run_workload(holder[0], arrivals)
    assert [s["total_tokens"] for s in history] == [4, 4, 4, 2, 1]
    return metrics


def test_metrics_of_a_hand_computed_schedule() -> None:
    # step 0: A[0:4] takes the whole budget; B waits (budget).            tokens 4
    # step 1: A[4:6] -> A's token 1;  B admitted, B[0:2].                  tokens 4
    # step 2: C arrives. decode A -> token 2 (A done); B[2:3] -> B's token 1;
    #         C admitted, C[0:2] -> C's token 1.                           tokens 1 + 1 + 2 = 4
    # step 3: decode B (token 2), C (token 2, C done).                     tokens 2
    # step 4: decode B (token 3, B done).                                  tokens 1
    # request  arrival  first sched  token steps  finish | queueing  ttft       e2e        tpot
    # A        0        0            1, 2         2      | 0         1-0+1 = 2  2-0+1 = 3  (2-1)/1 = 1.0
    # B        0        1            2, 3, 4      4      | 1         2-0+1 = 3  4-0+1 = 5  (4-2)/2 = 1.0
    # C        2        2            2, 3         3      | 0         2-2+1 = 1  3-2+1 = 2  (3-2)/1 = 1.0
    metrics = run_hand_schedule()
    expected = {"A": (0, 2, 3, 1.0, [1, 2]), "B": (1, 3, 5, 1.0, [2, 3, 4]), "C": (0, 1, 2, 1.0, [2, 3])}
    for req_id, (queueing, ttft, e2e, tpot, token_steps) in expected.items():
        r = metrics.collector.requests[req_id]
        assert (r.queueing_steps, r.ttft_steps, r.e2e_steps, r.tpot_steps, r.token_steps) == (
            queueing, ttft, e2e, tpot, token_steps), req_id
        assert (r.queueing_s, r.ttft_s, r.e2e_s, r.tpot_s) == (queueing, ttft, e2e, tpot), req_id
        assert r.preemptions == 0
    run = metrics.get_summary()["run"]
    assert run["steps"] == 5
    assert run["total_tokens"] == 15 and run["prefill_tokens"] == 6 + 3 + 2 and run["decode_tokens"] == 1 + 2 + 1
    assert run["tokens_per_step"] == 3.0  # 15 tokens / 5 steps
    assert run["gen_tokens"] == 7  # 2 + 3 + 2: 4 decode tokens + 3 first tokens from prefill
    assert run["ttft_p50_steps"] == 2 and run["queueing_p50_steps"] == 0 and run["tpot_p50_steps"] == 1.0
    # inclusive percentiles of [2, 3, 5]: p90 = 3 + 0.8 * (5 - 3), p99 = 3 + 0.98 * (5 - 3)
    assert run["e2e_p99_steps"] == pytest.approx(4.96) and run["e2e_p90_steps"] == pytest.approx(4.6)
    assert run["ttft_p99_steps"] == pytest.approx(2.98)  # of [1, 2, 3]
    assert (run["preemptions"], run["padding_tokens"], run["kv_utilization"]) == (0, 0, None)
    assert run["tokens_per_s"] > 0 and run["requests_per_s"] > 0  # real durations: only their sign is known


def test_metrics_plugin_counts_preemptions_and_pool_occupancy() -> None:
    # Two requests (prompt 2, 5 tokens; 3 blocks of 2 each at the end) on a shared pool of 4 blocks.
    # Blocks in use after each step: 2, 4, 4, then r0's 5th row preempts r1 (frees 2, r0 takes 1): 3;
    # r0 finishes: 0; r1 waits a step, then refills 5 rows (prompt + 3 tokens) in chunks 4 + 1: 2, 3;
    # its last decode finishes it: 0. Utilization = (2+4+4+3+0+2+3+0) / 8 steps / 4 blocks = 0.5625.
    manager = PluginManager()
    metrics = MetricsPlugin()
    manager.register_scheduler_plugin(metrics)
    sched = Scheduler(make_model(8), 4, 4, plugins=manager)
    pool = BlockPool(4, 2, 8)
    for i in range(2):
        sched.add_request(make_request(f"r{i}", 2, 5, 8, PagedKVCache(2, pool=pool)))
    sched.run_until_complete()
    assert [s.kv_blocks_used for s in metrics.collector.steps] == [2, 4, 4, 3, 0, 2, 3, 0]
    r0, r1 = metrics.collector.requests["r0"], metrics.collector.requests["r1"]
    assert (r0.token_steps, r0.preemptions, r0.tpot_steps) == ([0, 1, 2, 3, 4], 0, 1.0)
    # r1: tokens 1-3 in steps 0-2, preempted in step 3, token 4 ends its refill in step 6, token 5 in step 7
    assert (r1.token_steps, r1.preemptions, r1.tpot_steps, r1.e2e_steps) == ([0, 1, 2, 6, 7], 1, 1.75, 8)
    summary = metrics.get_summary()
    assert summary["requests"]["preemptions"] == summary["run"]["preemptions"] == 1
    assert summary["run"]["kv_utilization"] == 0.5625 and metrics.num_blocks == 4


def test_run_summary_has_the_keys_the_serving_layer_reads() -> None:
    run = run_hand_schedule().get_summary()["run"]
    for key in ("steps", "gen_tokens", "tokens_per_s", "tokens_per_step", "ttft_p50_steps", "ttft_p99_steps",
                "tpot_p50_steps", "e2e_p99_steps", "preemptions", "padding_tokens", "kv_utilization",
                "requests_per_s", "queueing_p50_steps"):
        assert key in run, key
