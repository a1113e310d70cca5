"""The main job (``python -m cb_lab``) and the workload helpers."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from helpers import make_model

from cb_lab import __main__ as main_job
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.scheduler import Scheduler
from cb_lab.exceptions import ConfigurationError
from cb_lab.model.oracle import naive_tokens, oracle_error
from cb_lab.workload import random_requests, run_workload

STEP_LINE = re.compile(r"^\s*(\d+)  ([DP.]+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$")


def test_main_job_prints_a_timeline_that_matches_its_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main_job.main(["--quick"]) == 0
    out = capsys.readouterr().out
    steps = [m.groups() for line in out.splitlines() if (m := STEP_LINE.match(line))]
    assert steps, out
    for _, bar, decode, prefill, _, _ in steps:
        assert bar.count("D") == int(decode) and bar.count("P") == int(prefill) and len(bar) == 8
    total = sum(int(d) + int(p) for _, _, d, p, _, _ in steps)
    assert f"steps: {len(steps)}, tokens: {total} " in out
    assert sum(int(f) for *_, f in steps) == 6 and "requests: 6 finished" in out
    assert re.search(r"oracle: max \|batched - naive recompute\| = \d\.\de-\d\d over 6 requests \(OK\)", out)


def test_main_job_with_paged_caches_tanh_and_compression(capsys: pytest.CaptureFixture[str]) -> None:
    assert main_job.main(["--quick", "--cache", "paged", "--block-size", "3", "--tanh", "--compression", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "paged caches" in out and "(OK)" in out
    stored, original = re.search(r"stored ([\d,]+) of ([\d,]+) K/V bytes", out).groups()  # type: ignore[union-attr]
    assert 2 * int(stored.replace(",", "")) == int(original.replace(",", ""))


def test_main_job_logs_through_the_logging_plugin(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cb_lab"):
        assert main_job.main(["--quick", "--log-level", "INFO"]) == 0
    assert any(" done: " in rec.getMessage() for rec in caplog.records)


@pytest.mark.parametrize("argv", [["--budget", "0"], ["--requests", "-1"], ["--cache", "tree"]])
def test_main_job_rejects_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main_job.main(argv)
    assert exc.value.code == 2
    assert argv[1] in capsys.readouterr().err


def test_random_requests_are_seeded_and_in_range() -> None:
    a = random_requests(20, dim=4, prompt_lens=(2, 5), output_lens=(0, 3), seed=3)
    b = random_requests(20, dim=4, prompt_lens=(2, 5), output_lens=(0, 3), seed=3, cache="paged", block_size=2)
    assert [r.req_id for r in a][:2] == ["r000", "r001"]
    assert all(2 <= r.prompt_len <= 5 and 0 <= r.max_new_tokens <= 3 for r in a)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.prompt, y.prompt, rtol=0, atol=0)
    shared = random_requests(20, dim=4, prompt_lens=(2, 5), output_lens=(0, 3), seed=3, cache="shared", block_size=2)
    pools = {id(r.kv_cache.pool) for r in shared if isinstance(r.kv_cache, PagedKVCache)}
    pool = shared[0].kv_cache.pool  # type: ignore[attr-defined]
    assert len(pools) == 1 and pool.num_blocks == sum(-(-(r.prompt_len + r.max_new_tokens) // 2) for r in shared)
    with pytest.raises(ConfigurationError, match="prompt_lens"):
        random_requests(1, dim=4, prompt_lens=(0, 3))
    with pytest.raises(ConfigurationError, match="output_lens"):
        random_requests(1, dim=4, output_lens=(5, 3))
    with pytest.raises(ConfigurationError, match="'tree'"):
        random_requests(1, dim=4, cache="tree")


def test_run_workload_adds_requests_at_their_arrival_step() -> None:
    model = make_model(4)
    sched = Scheduler(model, 4, 4)
    reqs = random_requests(3, dim=4, prompt_lens=(1, 1), output_lens=(1, 1))
    history = run_workload(sched, [(0, reqs[0]), (5, reqs[1]), (5, reqs[2])])
    # r0 runs at step 0; steps 1-4 idle (clock ticks on); r1 and r2 both run at step 5.
    assert [s["status"] for s in history] == ["completed"] + ["no_active_requests"] * 4 + ["completed"]
    assert history[-1]["prefill_tokens"] == 2
    assert oracle_error(model, reqs) < 1e-5


def test_naive_tokens_is_the_dense_recompute() -> None:
    model = make_model(4)
    req = random_requests(1, dim=4, prompt_lens=(3, 3), output_lens=(2, 2))[0]
    sched = Scheduler(model, 1, 1, sampler=torch.tanh)
    sched.add_request(req)
    sched.run_until_complete()
    seq = torch.cat([req.prompt, req.generated_tokens[0][None]])
    expected = torch.tanh(model.forward_prefill_dense(seq)[0][2:])
    torch.testing.assert_close(naive_tokens(model, req, torch.tanh), expected)
    assert oracle_error(model, [req], torch.tanh) < 1e-5
    assert oracle_error(model, [req]) > 1e-3  # forgetting the sampler is caught


def test_the_library_logs_but_never_prints(capsys: pytest.CaptureFixture[str]) -> None:
    import cb_lab

    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("cb_lab").handlers)
    sched = Scheduler(make_model(4), 4, 2)
    for req in random_requests(3, dim=4, prompt_lens=(1, 4), output_lens=(1, 3)):
        sched.add_request(req)
    sched.run_until_complete()
    assert capsys.readouterr().out == "" and cb_lab.__version__


@pytest.mark.parametrize("executor", ["fused", "split"])
def test_main_job_counts_model_calls_per_executor(executor: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main_job.main(["--quick", "--cache", "shared", "--executor", executor]) == 0
    out = capsys.readouterr().out
    steps = [m.groups() for line in out.splitlines() if (m := STEP_LINE.match(line))]
    calls = int(re.search(r"model calls: (\d+)", out).group(1))  # type: ignore[union-attr]
    if executor == "fused":
        assert calls == sum(1 for _, _, d, p, _, _ in steps if int(d) + int(p) > 0)
    else:
        assert calls == sum(int(d) + (int(p) > 0) for _, _, d, p, _, _ in steps)
    assert "(OK)" in out and f"{executor} executor" in out
