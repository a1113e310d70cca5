"""Checks the phase 3 exercises (docs/learning_materials/phase3_mix.md) against cb-lab itself."""

from __future__ import annotations

from types import ModuleType

import torch
from given import call, check, given
from helpers import TOL, make_model, make_request

from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.model.oracle import naive_tokens
from demos.demo_prefill_decode_mix import FULL_REQUESTS

PHASE = "phase3"


def demo_requests() -> list[Request]:
    """The requests of ``python -m demos.demo_prefill_decode_mix`` (the schedule needs only their lengths)."""
    return [make_request(r, n, k, 8) for r, n, k in FULL_REQUESTS]


def test_phase3_plan(answers: ModuleType) -> None:
    sched = Scheduler(make_model(8), max_tokens_per_step=6, prefill_chunk_size=4)
    for req in demo_requests():
        sched.add_request(req)
    plans = []
    for _ in range(4):
        plan = sched.schedule()
        plans.append(([r.req_id for r in plan.decode], [(c.request.req_id, c.start, c.end) for c in plan.prefill]))
        sched.step()
    got = [(list(d), [tuple(c) for c in p]) for d, p in given(answers, "PLANS_BUDGET_6")]
    check(len(got) == len(plans), "PLANS_BUDGET_6: one (decode, prefill) pair for each of steps 0..3")
    for step, (answer, expected) in enumerate(zip(got, plans)):
        check(answer == expected,
              f"PLANS_BUDGET_6, step {step}: decode first (one token per request whose prompt is done), then the "
              "running prefills, then admissions in arrival order, each chunk at most 4 rows and at most what is "
              "left of the 6 tokens")


def prefill_end_and_finish(budget: int, chunk: int) -> dict[str, tuple[int, int, int]]:
    """req_id -> (step its prefill ends, max_new_tokens, step it finishes)."""
    sched = Scheduler(make_model(8), budget, chunk)
    requests = demo_requests()
    for req in requests:
        sched.add_request(req)
    prefill_end: dict[str, int] = {}
    finish: dict[str, int] = {}
    while sched.active:
        step = sched.step_id
        sched.step()
        for req in requests:
            if req.generated_tokens and req.req_id not in prefill_end:
                prefill_end[req.req_id] = step
            if req.finished and req.req_id not in finish:
                finish[req.req_id] = step
    return {r.req_id: (prefill_end[r.req_id], r.max_new_tokens, finish[r.req_id]) for r in requests}


def test_phase3_finish(answers: ModuleType) -> None:
    check(given(answers, "F_FINISH_STEP_BUDGET_16") == prefill_end_and_finish(16, 4)["f"][2],
          "F_FINISH_STEP_BUDGET_16: f's first token comes out of step 2; how many more does it need, and how many "
          "does a decoding request get per step?")
    for budget in (3, 4, 6, 8, 16):
        for chunk in (2, 4, 16):
            for req_id, (end, n, finish) in prefill_end_and_finish(budget, chunk).items():
                check(call(answers, "finish_step", end, n) == finish,
                      f"finish_step({end}, {n}) (budget {budget}, chunk {chunk}, request {req_id}): does a "
                      "decoding request ever wait? count the token of step prefill_end_step too")


def test_phase3_break_refeed(answers: ModuleType) -> None:
    model = make_model(8)
    req = make_request("r", 8, 5, 8)
    out, k, v = model.forward_prefill_dense(req.prompt)  # the whole prompt in one prefill
    req.append_kv(k, v)
    req.prefill_pos = req.prompt_len
    req.append_token(out[-1])  # generated token 1
    feed = req.prompt[-1]  # the broken way: the last prompt row again, not req.decode_seed
    while not req.finished:
        out, k, v = model.forward_decode(feed, req.kv_cache)
        req.append_kv(k, v)
        req.append_token(out[0])
        feed = req.last_token
    want = naive_tokens(model, req)  # [n, D]: the oracle of the tokens it holds
    right = [i + 1 for i, tok in enumerate(req.generated_tokens) if torch.allclose(tok, want[i], **TOL)]
    check(given(answers, "TOKENS_STILL_RIGHT") == right,
          "TOKENS_STILL_RIGHT: which tokens are made before the wrong row is fed back, and can a token after a "
          "wrong one be right? python -m demos.demo_break_it --break refeed prints each token's error")
