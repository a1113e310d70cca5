"""The demos print what really happened: each test runs a demo's ``main(["--quick"])`` and
checks its output against the library's own state or an independent replay."""

from __future__ import annotations

import math
import re

import pytest
import torch

from cb_lab.core.batch_builder import build_ragged_batch
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from demos import (
    demo_paged_attention,
    demo_prefill_decode_mix,
    demo_prefill_only,
    demo_ragged_mask,
    demo_scheduler_timeline,
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


PAGED_ROW = re.compile(
    r"^(\w) after (prefill|decode)\s+\| len\s+(\d+) \| blocks used (\d+), free (\d+) \| "
    r"wasted slots (\d+) \| block_table \[(.*?)\] \| (.*)$"
)


@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_paged_attention(block_size: int, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_demo(demo_paged_attention.main, ["--quick", "--block-size", str(block_size)], capsys)
    specs = demo_paged_attention.QUICK_REQUESTS
    model = make_model(8, 0)  # the demo's model and prompts, rebuilt from the same seed
    prompts = [(r, torch.randn(n, 8), k) for r, n, k in specs]
    requests, after_prefill = demo_paged_attention.run(model, prompts, lambda: PagedKVCache(block_size))
    rows = [m for m in map(PAGED_ROW.match, out.splitlines()) if m]
    assert [(m[1], m[2]) for m in rows] == [(r, phase) for r, _, _ in specs for phase in ("prefill", "decode")]
    for m in rows:
        length, used, free, wasted = map(int, (m[3], m[4], m[5], m[6]))
        table = [int(b) for b in m[7].split(",")]
        prompt_len, max_new = next((n, k) for r, n, k in specs if r == m[1])
        assert length == (prompt_len if m[2] == "prefill" else prompt_len + max_new - 1)
        assert used == len(table) == math.ceil(length / block_size)
        assert wasted == used * block_size - length < block_size
        assert m[8].count("_") == wasted and m[8].count(":[") == used
        pool = 4  # each cache's private pool starts with 4 blocks and doubles when full
        while pool < used:
            pool *= 2
        assert free == pool - used
        if m[2] == "prefill":  # what the cache held in the step its prompt was done
            assert m[0] == f"{m[1]} after prefill | {after_prefill[m[1]]}"
        else:  # the final state is the real cache's
            cache = next(r.kv_cache for r in requests if r.req_id == m[1])
            assert isinstance(cache, PagedKVCache)
            assert (table, length, free) == (cache.block_table, len(cache), cache.num_blocks_free)
    assert len(diffs(out)) == 3 and max(diffs(out)) < 1e-5
