"""The demos print what really happened: each test runs a demo's ``main(["--quick"])`` and
checks its output against the library's own state or an independent replay."""

from __future__ import annotations

import math
import re

import pytest
import torch

from cb_lab.core.batch_builder import build_ragged_batch
from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from demos import (
    demo_fused_step,
    demo_paged_attention,
    demo_prefill_decode_mix,
    demo_prefill_only,
    demo_ragged_mask,
    demo_scheduler_timeline,
    demo_static_vs_continuous,
)
from demos._common import make_model, make_request, mask_grid

DIFF = re.compile(r"max \|[^|]+\| = (\S+)")
GRID_ROW = re.compile(r"^\s*(\w+)\s+(\d+) \| ([x. ]+)$")


def run_demo(main: object, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert callable(main)
    assert main(argv) == 0
    return capsys.readouterr().out


def diffs(out: str) -> list[float]:
    return [float(d) for d in DIFF.findall(out)]


def grid(out: str) -> tuple[list[tuple[str, int]], list[list[bool]]]:
    """The printed mask grid: row labels and cells (True where ``x``)."""
    rows = [m for m in map(GRID_ROW.match, out.splitlines()) if m]
    return [(m[1], int(m[2])) for m in rows], [[c == "x" for c in m[3].split()] for m in rows]


def test_mask_grid_draws_every_cell() -> None:
    mask = torch.tensor([[True, False], [True, True]])
    labels, cells = grid(mask_grid(mask, [("a", 0), ("b", 7)]))
    assert labels == [("a", 0), ("b", 7)]
    assert cells == mask.tolist()


@pytest.mark.parametrize("chunk", [None, "1", "5"])
def test_prefill_only(chunk: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_demo(demo_prefill_only.main, ["--quick"] + (["--chunk", chunk] if chunk else []), capsys)
    header = re.search(r"prompt: (\d+) rows of dim \d+, prefilled in chunks of (\d+)", out)
    assert header is not None
    length, size = int(header[1]), int(header[2])
    assert chunk is None or size == int(chunk)
    chunks = [tuple(map(int, m)) for m in re.findall(r"chunk\s+(\d+):(\d+)\s+-> cache len\s+(\d+)", out)]
    assert len(chunks) == math.ceil(length / size)
    assert [s for s, _, _ in chunks] == [0] + [e for _, e, _ in chunks[:-1]]  # contiguous from 0
    assert all(cache_len == e and e - s <= size for s, e, cache_len in chunks)
    assert chunks[-1][1] == length
    labels, cells = grid(out)
    assert labels == [("a", p) for p in range(length)]
    assert cells == [[k <= q for k in range(length)] for q in range(length)]
    assert len(diffs(out)) == 2 and max(diffs(out)) < 1e-5


def test_ragged_mask(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_demo(demo_ragged_mask.main, ["--quick"], capsys)
    specs = demo_ragged_mask.QUICK_CHUNKS
    assert any(s > 0 for _, s, _ in specs), "the demo shows a chunk on top of a cached prefix"
    _, meta, mask = build_ragged_batch([(r, s, torch.zeros(n, 4)) for r, s, n in specs])
    table = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:4]}
    assert table["global_idx"] == [str(m.global_idx) for m in meta]
    assert table["req_id"] == [m.req_id for m in meta]
    assert table["pos_in_seq"] == [str(m.pos_in_seq) for m in meta]
    labels, cells = grid(out)
    assert labels == [(m.req_id, m.pos_in_seq) for m in meta]
    assert cells == mask.tolist()
    assert sum(map(sum, cells)) == sum(n * (n + 1) // 2 for _, _, n in specs)
    assert len(diffs(out)) == len(specs) + 1 and max(diffs(out)) < 1e-5


STEP = re.compile(r"^step\s+(\d+) \| decode=\[(.*?)\] prefill=\[(.*?)\] \| tokens (\d+)/(\d+)(?: \| finished: (.*))?$")


@pytest.mark.parametrize("extra", [[], ["--tanh"], ["--budget", "3", "--chunk", "2"]])
def test_prefill_decode_mix(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    out = run_demo(demo_prefill_decode_mix.main, ["--quick", *extra], capsys)
    specs = {r: (n, k) for r, n, k in demo_prefill_decode_mix.QUICK_REQUESTS}
    config = re.search(r"budget (\d+), chunk (\d+)", out)
    assert config is not None
    budget, chunk = int(config[1]), int(config[2])
    steps = [m for m in map(STEP.match, out.splitlines()) if m]
    prefilled = dict.fromkeys(specs, 0)
    decoded = dict.fromkeys(specs, 0)
    finished: list[str] = []
    for i, m in enumerate(steps):
        assert int(m[1]) == i
        decode = m[2].split()
        chunks = [re.fullmatch(r"(\w+) (\d+):(\d+)", c.strip()) for c in m[3].split(",") if c.strip()]
        for c in chunks:
            assert c is not None and int(c[2]) == prefilled[c[1]], "chunks continue where the last one ended"
            assert 0 < int(c[3]) - int(c[2]) <= chunk
            prefilled[c[1]] = int(c[3])
        for r in decode:
            decoded[r] += 1
        assert int(m[4]) == len(decode) + sum(int(c[3]) - int(c[2]) for c in chunks if c) <= int(m[5]) == budget
        finished += (m[6] or "").split()
    assert prefilled == {r: n for r, (n, _) in specs.items()}
    assert decoded == {r: k - 1 for r, (_, k) in specs.items()}
    assert sorted(finished) == sorted(specs)
    assert len(diffs(out)) == len(specs) + 1 and max(diffs(out)) < 1e-5


def replay_timeline(budget: int, chunk: int, seed: int) -> tuple[dict[str, str], list[int], dict[str, int]]:
    """Run the timeline demo's workload on our own: cells per request, tokens per step, first-token step."""
    workload = demo_scheduler_timeline.make_workload(6, seed)
    sched = Scheduler(make_model(8, seed), budget, chunk)
    reqs: dict[str, Request] = {}
    cells = {a.req_id: "" for a in workload}
    tokens: list[int] = []
    first: dict[str, int] = {}
    t = 0
    while len(reqs) < len(workload) or sched.active:
        for a in (a for a in workload if a.step == t):
            reqs[a.req_id] = make_request(a.req_id, a.prompt_len, a.max_new_tokens, 8)
            sched.add_request(reqs[a.req_id])
        active = [r.req_id for r in sched.active]
        plan = sched.schedule()
        stats = sched.step()
        for r in cells:
            ran_d = any(q.req_id == r for q in plan.decode)
            ran_p = any(c.request.req_id == r for c in plan.prefill)
            cells[r] += "D" if ran_d else "P" if ran_p else "." if r in active else " "
        tokens.append(stats["total_tokens"] if stats["status"] == "completed" else 0)
        first |= {r: t for r, q in reqs.items() if q.generated_tokens and r not in first}
        t += 1
    return cells, tokens, first


@pytest.mark.parametrize("budget, chunk", [(8, 4), (3, 2), (16, 16)])
def test_scheduler_timeline(budget: int, chunk: int, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_demo(demo_scheduler_timeline.main, ["--quick", "--budget", str(budget), "--chunk", str(chunk)], capsys)
    workload = demo_scheduler_timeline.make_workload(6, 0)
    cells, tokens, first = replay_timeline(budget, chunk, 0)
    rows = re.findall(r"^\s*([a-z])\s+(\d+)\s+(\d+)/(\d+)\s+\| (.*)$", out, flags=re.M)
    assert len(rows) == len(workload)
    for (r, arrives, prompt_len, max_new, row), a in zip(rows, workload):
        assert (r, int(arrives), int(prompt_len), int(max_new)) == (a.req_id, a.step, a.prompt_len, a.max_new_tokens)
        assert row == cells[r]
        assert row.count("D") == a.max_new_tokens - 1  # token 1 comes from the last prefill chunk
        assert row[: a.step].strip() == "" and row[a.step] != " "
    steps = re.findall(r"^step\s+(\d+) \| ([DP.]+) \| (\d+)/(\d+)$", out, flags=re.M)
    assert [int(s[2]) for s in steps] == tokens
    assert all(bar.count("D") + bar.count("P") == int(used) and len(bar) == budget for _, bar, used, _ in steps)
    for s, (_, bar, _, _) in enumerate(steps):  # the bar's D count is the column's D count
        assert bar.count("D") == sum(row[s] == "D" for row in cells.values())
    summary = re.search(r"steps: (\d+), mean budget utilisation: (\d+)%, mean steps to first token: (\S+)", out)
    assert summary is not None
    assert int(summary[1]) == len(tokens)
    assert int(summary[2]) == round(100 * sum(tokens) / (len(tokens) * budget))
    mean_ttft = sum(first[a.req_id] - a.step + 1 for a in workload) / len(workload)
    assert float(summary[3]) == pytest.approx(mean_ttft, abs=0.005)


PoolStep = tuple[int, int, int]  # (num_blocks, blocks held, rows held)


def replay_paged(block_size: int) -> tuple[list[PoolStep], list[list[str]], dict[str, tuple[list[int], int]]]:
    """The paged demo's workload on our own, over one shared pool. Per step: pool size, blocks and
    rows held (summed over the caches, not read from the pool's counters), who finished; and each
    cache's (block_table, len) after its prefill and just before its last decode."""
    specs = demo_paged_attention.QUICK_REQUESTS
    pool = BlockPool(sum(math.ceil((n + k - 1) / block_size) for _, n, k in specs), block_size, 8)
    caches = {r: PagedKVCache(block_size, pool=pool) for r, _, _ in specs}
    reqs = [Request(r, torch.randn(n, 8), k, caches[r]) for r, n, k in specs]
    sched = Scheduler(make_model(8, 0), max_tokens_per_step=8, prefill_chunk_size=4)
    for req in reqs:
        sched.add_request(req)
    steps: list[PoolStep] = []
    finished: list[list[str]] = []
    seen: dict[str, tuple[list[int], int]] = {}
    while sched.active:
        for r in sched.active:
            if r.in_decode and len(r.generated_tokens) + 1 == r.max_new_tokens:
                seen[f"{r.req_id} at last decode"] = (list(caches[r.req_id].block_table), len(r.kv_cache))
        prefilling = [r for r in sched.active if r.in_prefill]
        active = list(sched.active)
        sched.step()
        for r in prefilling:
            if r.in_decode:
                seen[f"{r.req_id} after prefill"] = (list(caches[r.req_id].block_table), len(r.kv_cache))
        held = [c.block_table for c in caches.values()]
        assert len({b for t in held for b in t}) == sum(map(len, held)), "no block is in two tables"
        steps.append((pool.num_blocks, sum(map(len, held)), sum(map(len, caches.values()))))
        finished.append([r.req_id for r in active if r.finished])
    return steps, finished, seen


POOL_STEP = re.compile(
    r"^step\s+(\d+) \| num_blocks\s+(\d+), used_blocks\s+(\d+), free_blocks\s+(\d+), tokens_stored\s+(\d+), "
    r"unused_slots\s+(\d+)(?: \| finished: ([\w ]+) \(its blocks are free again\))?$"
)
PAGED_ROW = re.compile(
    r"^(\w) (after prefill|at last decode)\s+\| len\s+(\d+) \| unused slots (\d+) \| block_table \[(.*?)\] \| (.*)$"
)


@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_paged_attention(block_size: int, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_demo(demo_paged_attention.main, ["--quick", "--block-size", str(block_size)], capsys)
    specs = demo_paged_attention.QUICK_REQUESTS
    steps, finished, seen = replay_paged(block_size)
    pool_rows = [m for m in map(POOL_STEP.match, out.splitlines()) if m]
    assert [int(m[1]) for m in pool_rows] == list(range(len(steps)))
    for m, want, done in zip(pool_rows, steps, finished):
        num, used, free, tokens, unused = map(int, m.groups()[1:6])
        assert (num, used, tokens) == want
        assert free == num - used and unused == used * block_size - tokens
        assert (m[7] or "").split() == done
    assert (pool_rows[-1][3], pool_rows[-1][5]) == ("0", "0"), "every block is back in the pool at the end"
    rows = [m for m in map(PAGED_ROW.match, out.splitlines()) if m]
    assert [(m[1], m[2]) for m in rows] == [(r, w) for r, _, _ in specs for w in ("after prefill", "at last decode")]
    tables = []
    for m in rows:
        length, unused = int(m[3]), int(m[4])
        table = [int(b) for b in m[5].split(",")]
        prompt_len, max_new = next((n, k) for r, n, k in specs if r == m[1])
        assert length == (prompt_len if m[2] == "after prefill" else prompt_len + max_new - 2)
        assert (table, length) == seen[f"{m[1]} {m[2]}"], "the real block table at that moment"
        assert len(table) == math.ceil(length / block_size) and unused == len(table) * block_size - length < block_size
        drawn = re.findall(r"(\d+):\[([^\]]*)\]", m[6])
        assert [int(b) for b, _ in drawn] == table
        slots = [cell for _, cells in drawn for cell in cells.split()]
        assert slots == [str(p) for p in range(length)] + ["_"] * unused
        tables.append(table)
    assert any(t != list(range(t[0], t[0] + len(t))) for t in tables), "one shared pool: block tables interleave"
    assert len(diffs(out)) == 3 and max(diffs(out)) < 1e-5


FUSED_STEP = re.compile(r"^step\s+(\d+) \| (\d+) decode \+ (\d+) prefill \| model calls: split (\d+), fused (\d+)$")


Snapshot = list[tuple[str, list[int], int]]  # (req_id, block_table, len) per request


def replay_fused(
    dim: int, seed: int, num_blocks: int, upto: int
) -> tuple[list[tuple[int, int]], Snapshot, dict[int, str]]:
    """The fused-step demo's fused run on our own: (decode, prefill) tokens per step, every cache
    after step ``upto``, and who held each block before that step (its latest owner)."""
    d = demo_fused_step
    model = make_model(dim, seed)
    pool = BlockPool(num_blocks, d.BLOCK_SIZE, dim)
    caches = {r: PagedKVCache(d.BLOCK_SIZE, pool=pool) for r, _, _ in d.QUICK_REQUESTS}
    reqs = [Request(r, torch.randn(n, dim), k, caches[r]) for r, n, k in d.QUICK_REQUESTS]
    sched = Scheduler(model, d.BUDGET, d.CHUNK, executor="fused")
    for req in reqs:
        sched.add_request(req)
    tokens: list[tuple[int, int]] = []
    owner: dict[int, str] = {}
    snapshot: Snapshot = []
    before: dict[int, str] = {}
    while sched.active:
        stats = sched.step()
        tokens.append((stats["decode_tokens"], stats["prefill_tokens"]))
        if stats["step_id"] == upto:
            snapshot, before = [(r, list(c.block_table), len(c)) for r, c in caches.items()], dict(owner)
        owner |= {b: r for r, c in caches.items() for b in c.block_table}
    return tokens, snapshot, before


@pytest.mark.parametrize("extra", [[], ["--seed", "3", "--dim", "8"]])
def test_fused_step(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    out = run_demo(demo_fused_step.main, ["--quick", *extra], capsys)
    dim, seed = (8, 3) if extra else (16, 0)
    header = re.search(r"(\d+) requests, dim (\d+), budget (\d+), chunk (\d+), (\d+) blocks per pool", out)
    assert header is not None and int(header[2]) == dim
    shown = re.search(r"shared pool after step (\d+): (\d+)/(\d+) blocks used, (\d+) tokens stored, (\d+) unused", out)
    assert shown is not None
    tokens, snapshot, before = replay_fused(dim, seed, int(header[5]), int(shown[1]))
    steps = [tuple(map(int, m.groups())) for m in map(FUSED_STEP.match, out.splitlines()) if m]
    assert [(i, d, p) for i, d, p, _, _ in steps] == [(i, d, p) for i, (d, p) in enumerate(tokens)]
    for _, d, p, split, fused in steps:
        assert split == d + (1 if p else 0), "split: one forward per decode token, plus one for all prefill chunks"
        assert fused == (1 if d + p else 0), "fused: one forward per step"
    total = re.search(r"model calls in total: split (\d+), fused (\d+)", out)
    assert total is not None and (int(total[1]), int(total[2])) == (sum(s[3] for s in steps), sum(s[4] for s in steps))
    assert int(total[1]) > int(total[2])
    # The pool grid: one row per block id, rebuilt from the re-run's real block tables.
    bs = demo_fused_step.BLOCK_SIZE
    want = dict.fromkeys(range(int(header[5])), "free")
    for req_id, table, length in snapshot:
        for i, b in enumerate(table):
            filled = min(bs, length - i * bs)
            was = f"   <- was {before[b]}'s" if before.get(b, req_id) != req_id else ""
            want[b] = " ".join([req_id] * filled + ["."] * (bs - filled)) + was
    got = dict((int(b), row) for b, row in re.findall(r"^block\s+(\d+): (.*)$", out, flags=re.M))
    assert got == want
    assert any("<- was" in row for row in got.values()), "the grid shows a freed block holding another request's rows"
    live = ", ".join(f"{r} {t}" for r, t, _ in snapshot if t)
    assert f"block tables: {live}\n" in out
    used = sum(len(t) for _, t, _ in snapshot)
    stored = sum(n for _, _, n in snapshot)
    assert tuple(map(int, shown.groups()[1:])) == (used, int(header[5]), stored, used * bs - stored)
    assert "noisy" in out  # dim 16: the demo says its timing is tiny and noisy
    assert len(diffs(out)) == 3 and max(diffs(out)) < 1e-5


SVC_ROW = re.compile(r"^(static|continuous)\s+(\d+)\s+([\d.]+)\s+(\d+)\s+(\d+)\s+([\d,]+)$")


@pytest.mark.parametrize("slots", [16, 8])
def test_static_vs_continuous(slots: int, capsys: pytest.CaptureFixture[str]) -> None:
    from cb_lab.monitoring.trace import request_timeline
    from cb_lab.serving import QUICK_WORKLOAD, make_config, simulate
    from cb_lab.workload import generate_workload

    threads = torch.get_num_threads()
    out = run_demo(demo_static_vs_continuous.main, ["--quick", "--slots", str(slots)], capsys)
    assert torch.get_num_threads() == threads  # it runs on one thread and gives the caller its own back
    specs = generate_workload(QUICK_WORKLOAD)
    runs = {name: simulate(specs, make_config(name, max_num_seqs=slots, max_tokens_per_step=32 * slots), name=name)
            for name in ("static", "continuous")}
    rows = {m[1]: m for m in map(SVC_ROW.match, out.splitlines()) if m}
    assert set(rows) == {"static", "continuous"}
    for name, run in runs.items():
        s, m = run.summary, rows[name]
        assert (int(m[2]), float(m[3]), int(m[4]), int(m[5])) == (
            s["steps"], round(s["tokens_per_step"], 2), round(s["ttft_p99_steps"]), s["padding_tokens"])
    st, ct = runs["static"].summary, runs["continuous"].summary
    ratio = re.search(r"continuous / static: ([\d.]+)x tokens/step, ([\d.]+)x p99 TTFT \(counted in steps", out)
    assert ratio is not None
    assert float(ratio[1]) == round(ct["tokens_per_step"] / st["tokens_per_step"], 2) > 2
    assert float(ratio[2]) == round(ct["ttft_p99_steps"] / st["ttft_p99_steps"], 2) < 1
    assert re.search(r"^\* tokens/s: [\d.]+x on this machine's clock, which moves with its load$", out, flags=re.M)
    # Why: static batches are consecutive runs of `slots` requests (all arrive at step 0, FCFS).
    outputs = [s.max_new_tokens for s in specs]
    batches = [outputs[i : i + slots] for i in range(0, len(outputs), slots)]
    shown = re.findall(r"batch (\d+): (\d+) requests, outputs mean\s+([\d.]+), longest\s+(\d+): slots busy (\d+)%", out)
    assert len(shown) == 4
    for (_i, n, mean, longest, busy), b in zip(shown, batches):
        assert (int(n), float(mean), int(longest)) == (len(b), round(sum(b) / len(b), 1), max(b))
        assert int(busy) == round(100 * sum(b) / (len(b) * max(b)))
    mean_longest = sum(map(max, batches)) / len(batches)
    mean_output = sum(outputs) / len(outputs)
    assert f"all {len(batches)} batches: mean output {mean_output:.1f}, mean longest {mean_longest:.1f}" in out
    # The timelines are the runs' own: rows `slots - 4 ..` of the first 72 steps.
    drawn = re.findall(r"^(r\d+)\s+\|(.*)\|$", out, flags=re.M)
    assert len(drawn) == 24
    for (name, run), part in zip(runs.items(), (drawn[:12], drawn[12:])):
        rows_72 = request_timeline(run.steps[:72])
        assert part == [(r, "".join(rows_72[r])) for r in list(rows_72)[slots - 4 : slots + 8]], name
    assert len(diffs(out)) == 1 and max(diffs(out)) < 1e-5
