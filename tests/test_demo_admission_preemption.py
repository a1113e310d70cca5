"""demo_admission_preemption prints what really happened: every step's plan, the pool, the
per-request latencies and the preemptions, checked against an independent replay of its workload."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from demos import demo_admission_preemption as demo
from demos._common import make_model

STEP = re.compile(
    r"^step\s+(\d+) \| decode \[(.*?)\] \| prefill \[(.*?)\]( \| admitted \[(.*?)\])?( \| PREEMPTED \[(.*?)\])?"
    r"( \| waits: (.*?))? \| pool after: (\d+) used, (\d+) free$"
)
METRICS = re.compile(r"^(\w)\s+(\d+)\s+(\d+)\s+([\d.]+|-)\s+(\d+)\s+(\d+)$")


@dataclass
class Step:
    decode: list[str]
    prefill: list[str]  # "req_id start:end"
    admitted: list[str]
    preempted: list[str]
    skipped: list[tuple[str, str]]
    pool: tuple[int, int]  # used, free blocks after the step
    tokens: dict[str, int]  # tokens each request holds after the step


def replay(num_blocks: int, max_num_seqs: int) -> tuple[Scheduler, list[Request], list[Step]]:
    """The demo's quick workload on our own, planning each step with schedule() before step() runs it."""
    d = demo
    model = make_model(d.DIM, 0)
    pool = BlockPool(num_blocks, d.BLOCK_SIZE, d.DIM)
    reqs = [Request(r, torch.randn(n, d.DIM), k, PagedKVCache(d.BLOCK_SIZE, pool=pool)) for r, _, n, k in
            d.QUICK_REQUESTS]
    arrival = {r: a for r, a, _, _ in d.QUICK_REQUESTS}
    sched = Scheduler(model, d.BUDGET, d.CHUNK, max_num_seqs=max_num_seqs)
    steps: list[Step] = []
    added = 0
    while added < len(reqs) or sched.active:
        for req in reqs:
            if arrival[req.req_id] == sched.step_id:
                sched.add_request(req)
                added += 1
        plan = sched.schedule()  # pure: step() runs exactly this plan
        sched.step()
        steps.append(Step(
            [r.req_id for r in plan.decode], [f"{c.request.req_id} {c.start}:{c.end}" for c in plan.prefill],
            [r.req_id for r in plan.admitted], [r.req_id for r in plan.preempted], list(plan.skipped),
            (pool.num_used_blocks, pool.num_free_blocks), {r.req_id: len(r.generated_tokens) for r in reqs},
        ))
    return sched, reqs, steps


@pytest.mark.parametrize("extra", [[], ["--num-blocks", "16"], ["--max-num-seqs", "2"]])
def test_admission_preemption(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--quick", *extra]) == 0
    out = capsys.readouterr().out
    num_blocks = int(extra[1]) if extra[:1] == ["--num-blocks"] else 6
    max_num_seqs = int(extra[1]) if extra[:1] == ["--max-num-seqs"] else 3
    sched, reqs, steps = replay(num_blocks, max_num_seqs)
    rows = [m for m in map(STEP.match, out.splitlines()) if m]
    assert [int(m[1]) for m in rows] == list(range(len(steps)))
    for m, want in zip(rows, steps):
        assert m[2].split() == want.decode
        assert [c.strip() for c in m[3].split(",") if c.strip()] == want.prefill
        assert (m[5] or "").split() == want.admitted
        assert (m[7] or "").split() == want.preempted
        waits = re.findall(r"(\w+) \((\w+)\)", m[9] or "")
        assert waits == want.skipped, "the skip reasons are plan.skipped"
        assert (int(m[10]), int(m[11])) == want.pool
    printed = sum(len((m[7] or "").split()) for m in rows)
    shown = re.search(r"^preemptions: (\d+);", out, flags=re.MULTILINE)
    assert shown is not None and int(shown[1]) == printed == sched.num_preemptions
    if not extra:
        assert printed > 0, "the default run preempts"
        assert {why for want in steps for _, why in want.skipped} >= {"budget", "no_blocks", "max_num_seqs"}
    if extra[:1] == ["--num-blocks"]:
        assert printed == 0, "a pool that holds everyone never preempts"
    # Latencies in steps, from the replay's own token counts (arrival a, first token f, last e).
    arrival = {r: a for r, a, _, _ in demo.QUICK_REQUESTS}
    table = {m[1]: m for m in map(METRICS.match, out.splitlines()) if m}
    assert set(table) == {r.req_id for r in reqs}
    for req in reqs:
        counts = [s.tokens[req.req_id] for s in steps]
        f = next(i for i, n in enumerate(counts) if n >= 1)
        e = next(i for i, n in enumerate(counts) if n == req.max_new_tokens)
        q = next(i for i, s in enumerate(steps)
                 if req.req_id in s.decode or any(c.startswith(req.req_id + " ") for c in s.prefill))
        a, n = arrival[req.req_id], req.max_new_tokens
        m = table[req.req_id]
        assert (int(m[2]), int(m[3]), int(m[5]), int(m[6])) == (q - a, f - a + 1, e - a + 1, req.num_preemptions)
        assert m[4] == (f"{(e - f) / (n - 1):.2f}" if n >= 2 else "-")
    oracle = re.search(r"oracle: max \|batched - naive\| = (\S+) over every request \(preempted and recomputed: (.*)\)",
                       out)
    assert oracle is not None and float(oracle[1]) < 1e-5
    assert oracle[2].split() == ([r.req_id for r in reqs if r.num_preemptions] or ["none"])
    assert "'used_blocks': 0" in out, "every block is back in the pool at the end"
