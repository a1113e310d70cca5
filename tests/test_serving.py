"""The serving simulation (cb_lab/serving.py): policies on one engine, counted in steps.

Steps are deterministic, so every claim here is exact or a ratio of step counts; seconds
are reported by the benchmark (docs/benchmarks.md), never asserted.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import pytest
import torch

from cb_lab.exceptions import ConfigurationError
from cb_lab.model.oracle import oracle_error
from cb_lab.serving import (
    POLICY_PRESETS,
    RATIO_KEYS,
    SUMMARY_KEYS,
    RunResult,
    ServingConfig,
    batch_stats,
    check_fits,
    compare,
    make_config,
    ratios,
    simulate,
)
from cb_lab.workload import LengthDist, WorkloadConfig, generate_workload
from cb_lab.workload_io import RequestSpec

SLOTS = 8


def long_tailed(num_requests: int = 96, seed: int = 0) -> list[RequestSpec]:
    """Chat-like answers: median 4 tokens, a few up to 64 (lognormal, sigma 2)."""
    return generate_workload(WorkloadConfig(
        num_requests, LengthDist.uniform(4, 24), LengthDist.lognormal(4, 2.0, maximum=64), seed=seed))


class Headline(NamedTuple):
    specs: list[RequestSpec]
    static: RunResult
    continuous: RunResult


@pytest.fixture(scope="module")
def headline() -> Headline:
    specs = long_tailed()
    static, continuous = compare(specs, ["static", "continuous"], max_num_seqs=SLOTS, max_tokens_per_step=SLOTS * 32)
    return Headline(specs, static, continuous)


def test_continuous_batching_doubles_tokens_per_step_with_the_same_slots(headline: Headline) -> None:
    static, continuous = headline.static, headline.continuous
    assert static.config.max_num_seqs == continuous.config.max_num_seqs == SLOTS
    s, c = static.summary, continuous.summary
    assert s["gen_tokens"] == c["gen_tokens"] == sum(spec.max_new_tokens for spec in headline.specs)
    assert c["tokens_per_step"] >= 2 * s["tokens_per_step"]
    assert c["ttft_p99_steps"] < s["ttft_p99_steps"]
    assert s["padding_tokens"] > 0 == c["padding_tokens"]
    # Every static batch is SLOTS requests (the budget holds SLOTS prompt chunks) ...
    batches = [step.admitted for step in static.steps if step.admitted]
    assert [len(b) for b in batches[:-1]] == [SLOTS] * (len(batches) - 1)
    # ... and the next starts the step after the whole batch is done.
    running = [len(step.running) for step in static.steps]
    for step, before in zip(static.steps[1:], running):
        assert not step.admitted or before == 0
    assert max(len(step.running) for step in continuous.steps) == SLOTS


def test_batch_stats_explain_the_ratio_from_the_workload(headline: Headline) -> None:
    static, continuous = headline.static, headline.continuous
    outputs = [spec.max_new_tokens for spec in headline.specs]
    b = batch_stats(static)
    batches = [outputs[i : i + SLOTS] for i in range(0, len(outputs), SLOTS)]  # FCFS, all at step 0
    assert b["batches"] == len(batches) and b["batch_size"] == SLOTS
    assert b["mean_output"] == pytest.approx(sum(outputs) / len(outputs))
    assert b["mean_longest"] == pytest.approx(sum(map(max, batches)) / len(batches))
    # A static batch takes (its longest answer) decode steps plus its prefill steps; continuous
    # batching can at best divide the same tokens over fewer steps by that factor.
    measured = ratios(continuous.summary, static.summary)["tokens_per_step"]
    assert 1 < measured <= b["bound"] * 1.05


@pytest.mark.parametrize("batch, n", [(4, 9), (8, 5), (3, 17)])
def test_static_batching_pads_n_minus_1_times_b_minus_1_slots(batch: int, n: int) -> None:
    """HF's continuous-batching post: B requests, one generating n tokens, the others 1."""
    specs = [RequestSpec(f"r{i}", 0, 5 + i, n if i == 0 else 1) for i in range(batch)]
    config = make_config("static", max_num_seqs=batch, max_tokens_per_step=32 * batch, prefill_chunk_size=32)
    run = simulate(specs, config)
    assert run.steps[0].prefill_tokens == sum(s.prompt_len for s in specs), "every prompt prefilled in one step"
    assert run.summary["padding_tokens"] == (n - 1) * (batch - 1)
    assert [s.padding_tokens for s in run.steps] == [0] + [batch - 1] * (n - 1)
    assert run.summary["steps"] == n and run.oracle_error() < 1e-5
    # Continuous batching has nothing to pad: the finished slots are simply free.
    assert simulate(specs, make_config("continuous", max_num_seqs=batch)).summary["padding_tokens"] == 0


@pytest.mark.parametrize("name", list(POLICY_PRESETS))
def test_a_pool_too_small_preempts_yet_every_request_finishes_oracle_exact(name: str) -> None:
    specs = generate_workload(WorkloadConfig(24, LengthDist.uniform(4, 12), LengthDist.uniform(8, 24), seed=1))
    # 12 blocks of 4 rows: 48 rows for up to 6 requests that want up to 36 rows each. Every prefill
    # (up to 35 rows after a preemption) fits one chunk and the budget holds six of them, so no
    # request waits for blocks half-prefilled (docs/serving.md: a pool can deadlock on those).
    config = make_config(name, max_num_seqs=6, max_tokens_per_step=256, prefill_chunk_size=64, num_blocks=12,
                         block_size=4)
    run = simulate(specs, config)
    assert run.summary["preemptions"] > 0
    assert sum(r.num_preemptions for r in run.requests) == run.summary["preemptions"]
    assert all(r.finished and len(r.generated_tokens) == r.max_new_tokens for r in run.requests)
    assert oracle_error(run.model, run.requests) < 1e-5 and run.oracle_error() < 1e-5
    assert run.pool is not None
    assert run.pool.num_free_blocks == run.pool.num_blocks == 12 and run.pool.num_tokens == 0
    assert max(s.pool_used_blocks or 0 for s in run.steps) <= 12
    assert 0 < run.summary["kv_utilization"] <= 1


def test_every_policy_computes_the_same_tokens() -> None:
    """Same specs, weights and prompts: a schedule changes when a token is computed, never its value."""
    specs = long_tailed(20, seed=3)
    runs = compare(specs, list(POLICY_PRESETS), max_num_seqs=4, max_tokens_per_step=128)
    assert [r.name for r in runs] == list(POLICY_PRESETS)
    assert len({tuple(r.summary[k] for k in ("steps", "ttft_p99_steps")) for r in runs}) > 1, "the schedules differ"
    for run in runs[1:]:
        assert [r.req_id for r in run.requests] == [r.req_id for r in runs[0].requests]
        for a, b in zip(runs[0].requests, run.requests):
            torch.testing.assert_close(torch.stack(a.generated_tokens), torch.stack(b.generated_tokens),
                                       rtol=1e-5, atol=1e-5)


def test_the_summary_has_the_json_keys_and_counts_what_happened() -> None:
    specs = long_tailed(12)
    seen: list[tuple[int, int]] = []
    before = torch.random.get_rng_state()
    run = simulate(specs, "sjf", progress=lambda steps, done: seen.append((steps, done)))
    assert torch.equal(torch.random.get_rng_state(), before), "simulate leaves the global RNG alone"
    assert list(run.summary) == list(SUMMARY_KEYS)
    s = run.summary
    assert (s["policy"], s["requests"], s["steps"]) == ("sjf", 12, len(run.steps))
    assert s["gen_tokens"] == sum(len(r.generated_tokens) for r in run.requests)
    total = sum(step.tokens_used for step in run.steps)
    assert s["tokens_per_step"] == pytest.approx(total / len(run.steps))
    assert s["wall_s"] == run.wall_s > 0 and s["preemptions"] == 0 and s["kv_utilization"] is None
    assert [steps for steps, _ in seen] == list(range(1, len(run.steps) + 1))
    assert seen[-1][1] == 12 and [d for _, d in seen] == sorted(d for _, d in seen)
    assert all(len(r.kv_cache) == 0 for r in run.requests), "dense caches are emptied after the run"
    again = simulate(specs, "sjf")
    assert [s.decode for s in again.steps] == [s.decode for s in run.steps], "the same seed, the same schedule"


def test_ratios_divide_by_the_baseline() -> None:
    base = {"steps": 10, "tokens_per_s": 0.0, "ttft_p99_steps": 4.0}
    r = ratios({"steps": 5, "tokens_per_s": 3.0, "ttft_p99_steps": None}, base)
    assert set(r) == set(RATIO_KEYS)
    assert r["steps"] == 0.5 and r["tokens_per_s"] is None and r["ttft_p99_steps"] is None


def test_configs_are_checked_at_the_boundary(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigurationError, match="'fifo'"):
        ServingConfig(policy="fifo")
    with pytest.raises(ConfigurationError, match="max_num_seqs must be an int >= 1, got 0"):
        ServingConfig(max_num_seqs=0)
    with pytest.raises(ConfigurationError, match="'gpu'"):
        ServingConfig(executor="gpu")
    with pytest.raises(ConfigurationError, match="unknown policy 'fcfs'"):
        make_config("fcfs")
    with pytest.raises(ConfigurationError, match=r"\['policy'\] are not engine knobs"):
        make_config("static", policy="sjf")
    assert make_config("continuous_no_chunk", max_num_seqs=3) == ServingConfig(
        policy="decode_first", enable_chunked_prefill=False, max_num_seqs=3)
    long = [RequestSpec("a", 0, 40, 30)]
    with pytest.raises(ConfigurationError, match="'a' may need a 69-row prefill"):
        check_fits(long, make_config("continuous_no_chunk", max_tokens_per_step=64))
    with pytest.raises(ConfigurationError, match="'a' needs 18 KV blocks of 4 rows but num_blocks is 10"):
        simulate(long, make_config("continuous", num_blocks=10, block_size=4))
    check_fits(long, make_config("continuous", max_tokens_per_step=64))  # chunked: any prompt fits
    with pytest.raises(ConfigurationError, match="no requests"):
        check_fits([], make_config("static"))
    with pytest.raises(ConfigurationError, match="ServingConfig or a preset name"):
        simulate(long, 3)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="cb_lab"):
        simulate([RequestSpec("b", 0, 4, 2)], make_config("static", max_num_seqs=4, max_tokens_per_step=8))
    assert "fewer than max_num_seqs=4" in caplog.text


def test_the_rare_event_switches_each_happen_and_stay_oracle_exact() -> None:
    specs = generate_workload(WorkloadConfig(24, LengthDist.uniform(3, 20), LengthDist.uniform(1, 6), seed=2))
    config = make_config("continuous", max_num_seqs=6, prefill_chunk_size=8, num_blocks=40, block_size=4,
                         preempt_every=3)
    run = simulate(specs, config)
    steps = run.steps
    chunks = [(s, req_id, start, length) for s in steps for req_id, start, length in s.prefill]
    # forced preemption: only every third step preempts (the pool is big enough otherwise), and the
    # victim prefills again from row 0 later on
    assert all((s.step_id + 1) % 3 == 0 for s in steps if s.preempted)
    assert run.summary["preemptions"] == sum(len(s.preempted) for s in steps) > 0
    for s in steps:
        for victim in s.preempted:
            assert any(r == victim and st == 0 and c.step_id > s.step_id for c, r, st, _ in chunks)
    # a chunk ending on a block boundary: the same request's next chunk starts a fresh block
    boundary = [(s, r, st + n) for s, r, st, n in chunks if (st + n) % 4 == 0]
    followed = [(r, end) for _, r, end in boundary if any(r2 == r and st2 == end for _, r2, st2, _ in chunks)]
    assert followed, "some request went on prefilling right after a chunk that filled its last block"
    # max_new_tokens reached by the prefill's own token: finished in the step its prefill ended, no decode
    done_by_prefill = [r for r in run.requests if r.max_new_tokens == 1]
    assert done_by_prefill
    for req in done_by_prefill:
        last = max(s.step_id for s, r, _, _ in chunks if r == req.req_id)
        assert req.req_id in steps[last].finished and not any(req.req_id in s.decode for s in steps)
    assert run.oracle_error() < 1e-5 and run.pool is not None and run.pool.num_used_blocks == 0


def test_preempt_every_is_an_engine_knob_checked_at_the_boundary() -> None:
    assert make_config("sjf", preempt_every=2).preempt_every == 2
    with pytest.raises(ConfigurationError, match="preempt_every must be an int >= 1, got 0"):
        make_config("sjf", preempt_every=0)
