"""``python -m cb_lab simulate | compare``: the serving simulation's command line (cb_lab/cli.py)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from cb_lab import __main__ as main_job
from cb_lab import cli
from cb_lab.progress import ProgressBar
from cb_lab.serving import SUMMARY_KEYS, make_config, simulate
from cb_lab.workload import LengthDist, WorkloadConfig, generate_workload, load_workload
from cb_lab.workload_io import RequestSpec

SMALL = ["--requests", "24", "--prompt-dist", "uniform:4:24", "--output-dist", "lognormal:4:2.0:32",
         "--max-num-seqs", "4", "--budget", "128"]
JSON_KEYS = {"policy", "requests", "steps", "wall_s", "gen_tokens", "tokens_per_s", "tokens_per_step",
             "ttft_p50_steps", "ttft_p99_steps", "tpot_p50_steps", "e2e_p99_steps", "preemptions"}


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert cli.serve(argv + ["--json"]) == 0
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
    assert cli.serve(["simulate", "--policy", "continuous", *SMALL, "--num-blocks", "40", "--block-size", "4"]) == 0
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
    assert cli.serve(["compare", "--policies", "static,continuous", *SMALL]) == 0
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
    (["simulate", "--prefix-caching"], "give num_blocks too"),
    (["simulate", "--shared-prefixes", "2", "--prompt-dist", "lognormal:48:1.0"], "got lognormal:48:1:4096"),
])
def test_serving_commands_reject_bad_values(argv: list[str], named: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.serve(argv + ["--quick"])
    assert exc.value.code == 2
    assert named in capsys.readouterr().err


def test_the_progress_bar_waits_a_second_then_draws_on_stderr() -> None:
    now = [0.0]
    stream = io.StringIO()
    bar = ProgressBar("sjf", 40, stream, clock=lambda: now[0], enabled=True)
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
    ProgressBar("x", 1, quiet, clock=lambda: 0.0, enabled=True).close()
    assert quiet.getvalue() == ""
    not_a_terminal = io.StringIO()  # the default: draw only on a tty
    later = [0.0]
    log_bar = ProgressBar("x", 4, not_a_terminal, clock=lambda: later[0])
    later[0] = 5.0
    log_bar(100, 2)
    log_bar.close()
    assert not log_bar.enabled and not_a_terminal.getvalue() == ""


def test_parse_dist_reads_what_format_dist_writes() -> None:
    for text in ("fixed:16", "uniform:4:64", "lognormal:48:1:1024", "pareto:8:1.2:512"):
        assert cli.format_dist(cli.parse_dist(text)) == text
    assert cli.parse_dist("lognormal:48:1.0").maximum == 4096


def test_python_m_cb_lab_dispatches_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main_job.main(["simulate", *SMALL, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["command"] == "simulate" and data["policies"][0]["policy"] == "continuous"


def test_prefix_caching_on_shared_prefixes_saves_prefill_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*SMALL, "--num-blocks", "200", "--block-size", "4", "--shared-prefixes", "2", "--prefix-len", "12"]
    off, on = (run_json(["simulate", *argv, *extra], capsys)["policies"][0] for extra in ([], ["--prefix-caching"]))
    assert off["prefill_tokens_saved"] == 0 and on["config"]["enable_prefix_caching"]
    saved = on["prefill_tokens_saved"]
    assert saved > 0 and saved % 4 == 0 and on["gen_tokens"] == off["gen_tokens"] and on["oracle_error"] < 1e-5
    assert on["prefix_hit_rate"] == pytest.approx(saved / sum(s.prompt_len for s in cli_specs(argv)))
    assert cli.serve(["simulate", *argv, "--prefix-caching"]) == 0
    assert f"prefix cache continuous: {saved:,} prefill tokens saved" in capsys.readouterr().out


def cli_specs(argv: list[str]) -> list[RequestSpec]:
    args = cli.serving_parser().parse_args(["simulate", *argv])
    return cli.load_specs(args, cli.serving_parser())[0]


@pytest.mark.parametrize(("flags", "want"), [([], 1), (["--threads", "2"], 2), (["--dim", "512"], None)])
def test_a_small_model_runs_on_one_thread_and_the_caller_keeps_its_own(
    flags: list[str], want: int | None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    seen: list[int] = []
    real = cli.simulate
    monkeypatch.setattr(cli, "simulate", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    before = torch.get_num_threads()
    argv = ["simulate", "--requests", "3", "--prompt-dist", "fixed:4", "--output-dist", "fixed:2", *flags]
    assert cli.serve(argv) == 0
    assert torch.get_num_threads() == before  # set back for the caller
    expected = want if want is not None else before  # a bigger --dim keeps torch's own count
    assert seen == [expected]
    out = capsys.readouterr().out
    assert f", {expected} torch thread{'s' if expected > 1 else ''}; latencies in steps" in out
    assert "tok/s and wall s are this machine's clock" in out  # the wall-clock figures carry their caveat


@pytest.mark.parametrize("argv, named", [
    (["simulate", "--plot", "/proc/x"], "--plot /proc/x"),
    (["simulate", "--save-workload", "/nope/x.json"], "/nope/x.json"),
])
def test_unwritable_output_paths_are_refused_before_the_run(argv: list[str], named: str,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def no_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the run started before its output paths were checked")

    monkeypatch.setattr(cli, "simulate", no_run)
    monkeypatch.setattr(cli, "warm_up", no_run)
    with pytest.raises(SystemExit) as exc:
        cli.serve(argv + ["--quick"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
