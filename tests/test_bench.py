"""``python -m cb_lab.bench``: each subcommand's ``--quick`` run, checked through the tables it prints.

No timing is asserted (DESIGN.md section 5): only relations that hold whatever the clock says.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers import make_model

from cb_lab import bench
from cb_lab.bench import fused as fused_bench
from cb_lab.bench import memory as memory_bench
from cb_lab.bench import prefix as prefix_bench
from cb_lab.bench import soak as soak_bench
from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler

NUM = r"([\d,]+(?:\.\d+)?)"
FUSED_ROW = re.compile(rf"^\s*(\d+)\s+(\d+)\s+(\d+)\s+{NUM}x\s+(split|fused)\s+(\d+)\s+{NUM}\s+{NUM}\s+{NUM}"
                       rf"\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}x\s+{NUM}\s+{NUM}x\s+{NUM}$")
BOOK_ROW = re.compile(rf"^\s*(\d+)\s+(\d+)\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}x$")
MEMORY_ROW = re.compile(rf"^(shared pool|dense prealloc)\s+{NUM}\s+{NUM}\s+{NUM}%\s+{NUM}%\s+{NUM}\s+{NUM}$")


def num(text: str) -> float:
    return float(text.replace(",", ""))


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert bench.main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--quick"], ["workload", "--quick", "--executors", "fused", "split"]])
def test_workload_prints_one_row_per_configuration(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    out = run(argv, capsys)  # no subcommand: the workload benchmark, as before
    executors = argv[3:] or ["fused"]
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s+16\s+(dense|paged)\s", line)]
    assert [r[1:3] for r in rows] == [[c, e] for c in ("dense", "paged") for e in executors]
    assert len({r[3] for r in rows}) == 1, "the schedule depends on neither the cache layout nor the executor"
    assert all(int(r[3]) > 0 and num(r[4]) > 0 for r in rows)
    for e in executors:
        assert re.search(rf"dim 16, {e}: paged runs at \d+\.\d\dx the speed of dense", out)
    assert ("fused runs at" in out) == (len(executors) == 2)


def test_fused_compares_both_executors_per_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    out = run(["fused", "--quick", "--device", "cpu"], capsys)
    assert "timed steps per dim: 16: 2, 64: 2" in out and "device cpu" in out
    rows = [m.groups() for line in out.splitlines() if (m := FUSED_ROW.match(line))]
    configs = [(int(r[0]), int(r[1])) for r in rows]
    assert configs == [(d, b) for d in (16, 64) for b in (4, 8) for _ in range(2)], out
    assert [r[4] for r in rows] == ["split", "fused"] * 4
    for split, fused in zip(rows[::2], rows[1::2]):  # whole blocks in use, never a padded table
        assert 1 <= num(split[3]) == num(fused[3]) < 2
    for _dim, running, ctx, _, executor, steps, decode, prefill, calls, *_, speed, floor, _, fresh in rows:
        assert int(steps) == 2 and num(decode) == int(running) and num(floor) >= 0 and num(fresh) >= 0
        assert 8 <= int(ctx) <= 32 + 2 + 2  # prompts 8..32, plus the decodes of prefill and warm-up
        if executor == "split":  # one forward per decode token (+1 for the ragged prefill, if any)
            assert num(calls) == num(decode) + (num(prefill) > 0) and speed == "1.00"
        else:
            assert num(calls) == 1
    book = [m.groups() for line in out.splitlines() if (m := BOOK_ROW.match(line))]
    assert [(int(r[0]), int(r[1])) for r in book] == configs[::2]
    for _, running, _, _, total, per_request, _, _ in book:
        # total is printed to 0.001 ms, per request to 0.1 us: allow both roundings
        assert num(per_request) == pytest.approx(num(total) * 1e3 / int(running), abs=0.5 / int(running) + 0.05)


def test_timed_step_counts_a_prefill_forward_plus_one_per_decode() -> None:
    model = make_model(8)
    pool = BlockPool(16, 4, 8)
    sched = Scheduler(model, 16, 4, executor="split")
    for i, n in enumerate((3, 6)):
        sched.add_request(Request(f"r{i}", torch.randn(n, 8), 4, PagedKVCache(4, pool=pool)))
    fused_bench.timed_step(sched)  # r0 prefills whole, r1 its first chunk of 4
    t = fused_bench.timed_step(sched)  # r0 decodes, r1 prefills its last 2 rows
    assert (t.decode_tokens, t.prefill_tokens, sched.executor.num_model_calls) == (1, 2, 1 + 2)
    assert t.step_s == pytest.approx(t.schedule_s + t.forward_s + t.commit_s)


def test_both_executors_start_from_identical_but_separate_states() -> None:
    args = bench.parse_args(["fused", "--quick"])
    scheds = fused_bench.decoding_schedulers(make_model(8), [5, 17, 9], args)
    split, fused = (scheds[name].active for name in ("split", "fused"))
    assert [len(r.kv_cache) for r in split] == [len(r.kv_cache) for r in fused] == [5, 17, 9]
    assert all(r.in_decode for r in split + fused)
    pools = [r.kv_cache.pool for r in (split[0], fused[0]) if isinstance(r.kv_cache, PagedKVCache)]
    assert len(pools) == 2 and pools[0] is not pools[1] and pools[0] is not None and pools[1] is not None
    torch.testing.assert_close(pools[0].key_cache, pools[1].key_cache, rtol=0, atol=0)
    fused_bench.timed_step(scheds["fused"])
    assert [len(r.kv_cache) for r in split] == [5, 17, 9], "stepping one set leaves the other alone"
    assert type(scheds["split"].executor).__name__ == "SplitExecutor"


def test_memory_compares_the_pool_with_dense_preallocation(capsys: pytest.CaptureFixture[str]) -> None:
    out = run(["memory", "--quick"], capsys)
    rows = {m.group(1): [num(x) for x in m.groups()[1:]] for line in out.splitlines() if (m := MEMORY_ROW.match(line))}
    assert list(rows) == ["shared pool", "dense prealloc"], out
    for peak, used, waste_at_peak, avg_waste, per_request, worst in rows.values():
        assert 0 < used <= peak
        assert waste_at_peak == pytest.approx(100 * (peak - used) / peak, abs=0.05)
        assert 0 <= avg_waste < 100 and 0 <= per_request <= worst
    pool, dense = rows["shared pool"], rows["dense prealloc"]
    assert dense[0] >= pool[0], "preallocating each request's maximum holds at least the pool's blocks"
    ratio = re.search(r"dense preallocation needs (\d+\.\d\d)x the slots", out)
    assert ratio and float(ratio.group(1)) == pytest.approx(dense[0] / pool[0], abs=0.005)
    assert re.search(r"64 requests at step 0, .* \d+ steps, peak \d+ running", out)


def test_skewed_requests_are_seeded_and_share_one_pool() -> None:
    args = bench.parse_args(["memory", "--quick"])
    a, b = memory_bench.skewed_requests(args, 4), memory_bench.skewed_requests(args, 4)
    assert [(r.prompt_len, r.max_new_tokens) for r in a] == [(r.prompt_len, r.max_new_tokens) for r in b]
    assert all(16 <= r.prompt_len <= 128 and 1 <= r.max_new_tokens <= 128 for r in a)
    pools = {id(r.kv_cache.pool) for r in a if isinstance(r.kv_cache, PagedKVCache)}
    assert len(pools) == 1 and len(a) == 64


def test_bad_arguments_exit_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["fused", "--running", "many"])
    assert exc.value.code == 2 and "many" in capsys.readouterr().err


BAD_DEVICES = [("tpu9", "'tpu9' is not a torch device"), ("meta", "'meta' is not available")]


@pytest.mark.parametrize("device, needle", BAD_DEVICES + ([] if torch.cuda.is_available() else [
    ("cuda", "'cuda' is not available")]))
def test_fused_refuses_a_device_it_cannot_use(device: str, needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["fused", "--quick", "--device", device])
    assert exc.value.code == 2 and needle in capsys.readouterr().err


SOAK_TENTH = re.compile(r"^\s+(\d+)\s+([\d,]+)\s+([\d.]+)\s+([\d,]+)\s+([\d.]+)$")


def test_soak_runs_continuous_arrivals_and_ends_with_a_free_pool(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["soak", "--quick"]  # 1,000 steps
    out = run(argv, capsys)
    tenths = [m.groups() for line in out.splitlines() if (m := SOAK_TENTH.match(line))]
    assert [int(t[0]) for t in tenths] == list(range(1, 11)), out
    for _, tokens, seconds, per_s, _ in tenths:
        assert num(per_s) == pytest.approx(num(tokens) / float(seconds), rel=0.05, abs=1000)
    arrived = sum(len(specs) for specs in soak_bench.arrivals_by_step(bench.parse_args(argv)).values())
    finished = re.search(r"^([\d,]+) requests finished", out, flags=re.M)
    assert finished and num(finished[1]) == arrived > 300, "every request that arrived finished"
    assert "'used_blocks': 0" in out and re.search(r"leak detector '(ok|leak_detected)'", out)
    assert re.search(r"oracle: [1-9]\d* requests checked as they finished, max \|batched - naive\| = \S+", out)


LLAMA_ROW = re.compile(r"^(cb-lab|hf [a-z_ ]+?)\s+([\d.]+)\s+([\d,]+)\s+([\d.]+)x\s+(\d+)/(\d+)$")


def test_llama_compares_four_ways_on_identical_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    out = run(["llama", "--quick"], capsys)
    rows = {m[1]: m.groups()[1:] for line in out.splitlines() if (m := LLAMA_ROW.match(line))}
    assert list(rows) == ["cb-lab", "hf generate_batch", "hf padded generate", "hf one at a time"], out
    for seconds, per_s, _speed, same, total in rows.values():
        assert same == total == "8", "greedy tokens agree with cb-lab's for every prompt"
        assert num(per_s) > 0 and float(seconds) >= 0  # the quick run is too short for rounded seconds to check
    assert rows["cb-lab"][2] == "1.00"
    assert re.search(r"cb-lab takes [\d.]+x the floor", out) and "weight matmuls about" in out
    profile = re.search(r"where a decode step goes \((\d+) running; [\d.]+ ms a step unprofiled.*\n((?:  .*\n)+)", out)
    assert profile and profile[1] == "8", out  # every prompt decodes in the profiled steps
    shares = [int(line.rsplit(None, 1)[1].rstrip("%")) for line in profile[2].splitlines()]
    assert len(shares) == 8 and shares == sorted(shares, reverse=True) and sum(shares) <= 100 + len(shares)


PREFIX_ROW = re.compile(rf"^caching (off|on)\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+(\d+)$", re.M)


def test_prefix_counts_the_prefill_tokens_caching_saves(capsys: pytest.CaptureFixture[str]) -> None:
    out = run(["prefix", "--quick"], capsys)
    rows = {m[1]: m for m in PREFIX_ROW.finditer(out)}
    args = bench.parse_args(["prefix", "--quick"])
    prompts = prefix_bench.make_prompts(args, True)
    assert num(rows["off"][2]) == sum(p.shape[0] for p in prompts) and num(rows["off"][3]) == 0
    saved = num(rows["on"][3])
    assert num(rows["on"][2]) == num(rows["off"][2]) - saved  # ample pool: no preemption recomputes
    assert saved > 0 and saved % prefix_bench.BLOCK_SIZE == 0 and saved <= (len(prompts) - 1) * args.prefix_len
    assert num(rows["on"][6]) < num(rows["off"][6])  # TTFT p50 in steps
    assert f"same tokens {len(prompts)}/{len(prompts)}" in out
    assert re.search(r"no shared prefix \(best of 1\): .* saved 0 tokens", out)


REAL_ROW = re.compile(r"^  (cb-lab|hf [a-z_ ,0-9()]+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s+(\S+)\s+(\S+)"
                      r"\s+(\d+)/(\d+)$")


def test_real_compares_the_ways_on_the_real_model(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    from cb_lab.model.registry import DEFAULT_MODEL, model_file

    if model_file(DEFAULT_MODEL) is None:
        pytest.skip(f"{DEFAULT_MODEL} is not installed: make model")
    out = run(["real", "--quick"], capsys)
    rows = [m.groups() for line in out.splitlines() if (m := REAL_ROW.match(line))]
    names = [r[0] for r in rows]
    assert names[:2] == ["cb-lab", "hf padded generate, batches of 4"] and names.count("cb-lab") == 2, out
    assert "hf generate_batch" in names and "hf one at a time (2 prompts)" in names
    for name, _s, per_s, speed, _p50, _p99, same, total in rows:
        assert same == total, f"{name}: greedy tokens agree with cb-lab's for every prompt"
        assert float(per_s) > 0 and (name != "cb-lab" or speed == "1.00")
    assert len(re.findall(r"floor [\d.]+ s: cb-lab takes [\d.]+x it", out)) == 2
    shares = [int(s) for s in re.findall(r"ms/step\s+(\d+)%", out)]
    assert len(shares) == 5 and 97 <= sum(shares) <= 103  # the parts add up to the whole step
