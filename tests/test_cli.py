"""The main job (``python -m cb_lab``) and the workload helpers."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from helpers import make_model

from cb_lab import __main__ as cli
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.scheduler import Scheduler
from cb_lab.exceptions import ConfigurationError
from cb_lab.model.oracle import naive_tokens, oracle_error
from cb_lab.workload import random_requests, run_workload

STEP_LINE = re.compile(r"^\s*(\d+)  ([DP.]+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$")


def test_main_job_prints_a_timeline_that_matches_its_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--quick"]) == 0
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
    assert cli.main(["--quick", "--cache", "paged", "--block-size", "3", "--tanh", "--compression", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "paged caches" in out and "(OK)" in out
    stored, original = re.search(r"stored ([\d,]+) of ([\d,]+) K/V bytes", out).groups()  # type: ignore[union-attr]
    assert 2 * int(stored.replace(",", "")) == int(original.replace(",", ""))


def test_main_job_logs_through_the_logging_plugin(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cb_lab"):
        assert cli.main(["--quick", "--log-level", "INFO"]) == 0
    assert any(" done: " in rec.getMessage() for rec in caplog.records)


@pytest.mark.parametrize("argv", [["--budget", "0"], ["--requests", "-1"], ["--cache", "tree"]])
def test_main_job_rejects_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
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
    assert cli.main(["--quick", "--cache", "shared", "--executor", executor]) == 0
    out = capsys.readouterr().out
    steps = [m.groups() for line in out.splitlines() if (m := STEP_LINE.match(line))]
    calls = int(re.search(r"model calls: (\d+)", out).group(1))  # type: ignore[union-attr]
    if executor == "fused":
        assert calls == sum(1 for _, _, d, p, _, _ in steps if int(d) + int(p) > 0)
    else:
        assert calls == sum(int(d) + (int(p) > 0) for _, _, d, p, _, _ in steps)
    assert "(OK)" in out and f"{executor} executor" in out


# --- python -m cb_lab simulate | compare (the serving simulation) ----------------------------------

import io  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from cb_lab.serving import SUMMARY_KEYS, make_config, simulate  # noqa: E402
from cb_lab.workload import LengthDist, WorkloadConfig, generate_workload, load_workload  # noqa: E402

SMALL = ["--requests", "24", "--prompt-dist", "uniform:4:24", "--output-dist", "lognormal:4:2.0:32",
         "--max-num-seqs", "4", "--budget", "128"]
JSON_KEYS = {"policy", "requests", "steps", "wall_s", "gen_tokens", "tokens_per_s", "tokens_per_step",
             "ttft_p50_steps", "ttft_p99_steps", "tpot_p50_steps", "e2e_p99_steps", "preemptions"}


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert cli.main(argv + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)  # the whole of stdout is one JSON object
    assert isinstance(data, dict)
    return data


def test_compare_json_has_every_key_and_its_ratios_divide_by_static(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(["compare", *SMALL], capsys)
    policies = data["policies"]
    assert isinstance(policies, list)
    assert [p["policy"] for p in policies] == ["static", "continuous", "continuous_no_chunk", "prefill_first", "sjf"]
    assert data["baseline"] == "static" and data["command"] == "compare"
    static = policies[0]
    for p in policies:
        assert JSON_KEYS <= set(p) and set(SUMMARY_KEYS) <= set(p)
        assert p["requests"] == 24 and p["oracle_error"] < 1e-5 and p["config"]["max_num_seqs"] == 4
        assert p["gen_tokens"] == static["gen_tokens"]
        for key, ratio in p["ratio_to_static"].items():
            assert ratio == pytest.approx(p[key] / static[key]), key
    assert policies[1]["ratio_to_static"]["tokens_per_step"] > 1  # continuous beats static per step
    assert data["static_batches"]["batch_size"] == 4
    # The same numbers as the library gives for that workload and knobs (steps are deterministic).
    specs = generate_workload(WorkloadConfig(24, LengthDist.uniform(4, 24), LengthDist.lognormal(4, 2.0, maximum=32)))
    run = simulate(specs, make_config("sjf", max_num_seqs=4, max_tokens_per_step=128))
    assert {k: policies[4][k] for k in ("steps", "ttft_p99_steps", "tokens_per_step")} == {
        k: run.summary[k] for k in ("steps", "ttft_p99_steps", "tokens_per_step")}


def test_simulate_json_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(["simulate", "--policy", "static", *SMALL, "--num-blocks", "64", "--block-size", "4",
                     "--plot", str(tmp_path)], capsys)
    (p,) = data["policies"]  # type: ignore[misc]
    assert JSON_KEYS <= set(p) and p["policy"] == "static" and "ratio_to_static" not in p
    assert p["padding_tokens"] > 0 and 0 < p["kv_utilization"] <= 1
    pngs = sorted(Path(x).name for x in p["plots"])
    assert pngs == ["batch_composition.png", "pool_occupancy.png", "timeline.png"]
    assert all((tmp_path / "static" / name).stat().st_size > 0 for name in pngs)


def test_simulate_draws_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["simulate", "--policy", "continuous", *SMALL, "--num-blocks", "40", "--block-size", "4"]) == 0
    out = capsys.readouterr().out
    row = re.search(r"^continuous\s+(\d+)\s+([\d.]+)\s", out, flags=re.M)
    assert row is not None
    steps = int(row[1])
    assert f"the first {min(80, steps)} of {steps} steps" in out
    assert "timeline:" in out and "batch composition:" in out and "KV pool occupancy:" in out
    assert "... and 8 more requests" in out  # 24 requests, the first 16 drawn
    bars = re.findall(r"^step\s+\d+ \|([DP#.]*)\| (\d+)/128", out, flags=re.M)
    assert bars and all(len(bar) == 64 for bar, _ in bars)  # 128-token budget bars squeezed to the terminal
    assert re.search(r"oracle continuous: max \|batched - naive recompute\| = \S+ \(OK\)", out)


def test_compare_explains_the_ratio_in_words(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["compare", "--policies", "static,continuous", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "ratio to static" in out and re.search(r"^continuous\s+[\d.]+x\s+([\d.]+)x", out, flags=re.M)
    why = re.search(r"ran (\d+) batches of ([\d.]+) requests.*mean output ([\d.]+) tokens, mean longest answer per "
                    r"batch ([\d.]+).*at best [\d.]+ / [\d.]+ = ([\d.]+)x", out, flags=re.S)
    assert why is not None and (why[1], why[2]) == ("6", "4.0")
    assert float(why[5]) == pytest.approx(float(why[4]) / float(why[3]), abs=0.01)


def test_a_workload_file_round_trips_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "w.csv"
    first = run_json(["compare", "--policies", "static,sjf", *SMALL, "--save-workload", str(path)], capsys)
    assert load_workload(path) == generate_workload(
        WorkloadConfig(24, LengthDist.uniform(4, 24), LengthDist.lognormal(4, 2.0, maximum=32)))
    again = run_json(["compare", "--policies", "static,sjf", "--workload", str(path), "--max-num-seqs", "4",
                      "--budget", "128"], capsys)
    assert str(path) in str(again["workload"])
    keys = ("steps", "gen_tokens", "ttft_p99_steps", "e2e_p99_steps", "padding_tokens")
    def table(data: dict[str, object]) -> list[list[object]]:
        return [[p[k] for k in keys] for p in data["policies"]]  # type: ignore[attr-defined]

    assert table(first) == table(again)


@pytest.mark.parametrize("argv, named", [
    (["compare", "--policies", "static,fifo"], "'fifo'"),
    (["compare", "--policies", "sjf,sjf"], "'sjf,sjf'"),
    (["simulate", "--policy", "lifo"], "'lifo'"),
    (["simulate", "--output-dist", "pareto:0:1.2"], "'pareto:0:1.2'"),
    (["simulate", "--prompt-dist", "normal:3:1"], "'normal:3:1'"),
    (["simulate", "--budget", "0"], "'0'"),
    (["simulate", "--rate", "-2"], "'-2'"),
    (["simulate", "--rate", "2"], "--rate 2 needs --arrival poisson"),
    (["simulate", "--workload", "w.txt"], "'.txt'"),
    (["simulate", "--workload", "w.csv", "--requests", "3"], "replaces --requests"),
    (["compare", "--policies", "continuous_no_chunk", "--budget", "64"], "chunked prefill is off"),
    (["simulate", "--num-blocks", "2"], "num_blocks is 2"),
])
def test_serving_commands_reject_bad_values(argv: list[str], named: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + ["--quick"])
    assert exc.value.code == 2
    assert named in capsys.readouterr().err


def test_the_progress_bar_waits_a_second_then_draws_on_stderr() -> None:
    now = [0.0]
    stream = io.StringIO()
    bar = cli.ProgressBar("sjf", 40, stream, clock=lambda: now[0])
    bar(10, 4)
    assert stream.getvalue() == "", "nothing for runs shorter than a second"
    now[0] = 1.5
    bar(300, 10)
    assert stream.getvalue() == "\rsjf [#######.......................] 10/40 requests, 300 steps"
    now[0] = 1.55
    bar(301, 11)  # within 0.1 s of the last draw: skipped
    now[0] = 1.6
    bar(302, 40)
    assert stream.getvalue().endswith("\rsjf [##############################] 40/40 requests, 302 steps")
    bar.close()
    last = "sjf [##############################] 40/40 requests, 302 steps"
    assert stream.getvalue().endswith("\r" + " " * len(last) + "\r")
    quiet = io.StringIO()
    cli.ProgressBar("x", 1, quiet, clock=lambda: 0.0).close()
    assert quiet.getvalue() == ""


def test_parse_dist_reads_what_format_dist_writes() -> None:
    for text in ("fixed:16", "uniform:4:64", "lognormal:48:1:1024", "pareto:8:1.2:512"):
        assert cli.format_dist(cli.parse_dist(text)) == text
    assert cli.parse_dist("lognormal:48:1.0").maximum == 4096
