"""Checks the phase 1 exercises (docs/learning_materials/phase1_prefill.md) against cb-lab itself."""

from __future__ import annotations

from types import ModuleType

import torch
from given import call, check, given
from helpers import TOL, make_model, make_request

from cb_lab.attention.dense_attention import causal_mask
from cb_lab.core.scheduler import Scheduler

PHASE = "phase1"


def test_phase1_chunks(answers: ModuleType) -> None:
    req = make_request("a", 14, 1, 8)
    sched = Scheduler(make_model(8), max_tokens_per_step=4, prefill_chunk_size=4)
    sched.add_request(req)
    chunks = []
    while sched.active:
        chunks += [(c.start, c.end) for c in sched.schedule().prefill]
        sched.step()
    check(given(answers, "CHUNKS_14_BY_4") == chunks,
          "CHUNKS_14_BY_4: (start, end) pairs, end excluded, each chunk at most 4 rows, from 0 to the end of "
          "the prompt; python -m demos.demo_prefill_only prints them")


def test_phase1_cache_len(answers: ModuleType) -> None:
    req = make_request("a", 10, 5, 8)
    sched = Scheduler(make_model(8), max_tokens_per_step=4, prefill_chunk_size=4)
    sched.add_request(req)
    after_prefill = None
    while sched.active:
        sched.step()
        if after_prefill is None and req.in_decode:
            after_prefill = len(req.kv_cache)
    check(given(answers, "CACHE_LEN_AFTER_PREFILL") == after_prefill,
          "CACHE_LEN_AFTER_PREFILL: which rows has the request run through the model by the end of its prefill?")
    check(given(answers, "CACHE_LEN_AT_FINISH") == len(req.kv_cache),
          "CACHE_LEN_AT_FINISH: each decode appends the K/V of the token it feeds back; is the last token "
          "ever fed back?")


def test_phase1_chunk_mask(answers: ModuleType) -> None:
    for start, end in [(0, 1), (0, 5), (3, 6), (6, 8), (7, 8)]:
        mask = call(answers, "chunk_mask", start, end)
        check(isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and tuple(mask.shape) == (end - start, end),
              f"chunk_mask({start}, {end}) should be a bool tensor of shape [end - start, end]")
        check(torch.equal(mask, causal_mask(end - start, end)),
              f"chunk_mask({start}, {end}): row i is the query at position {start} + i; which key positions "
              "0..end-1 may it see?")
    model = make_model(8)
    prompt = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    dense_out, k_all, v_all = model.forward_prefill_dense(prompt)
    for start, end in [(0, 3), (3, 6), (6, 8)]:  # each chunk on top of the cached rows [0, start)
        past = (k_all[:start], v_all[:start]) if start else None
        out, _, _ = model.forward_prefill_ragged(prompt[start:end], call(answers, "chunk_mask", start, end), past)
        check(torch.allclose(out, dense_out[start:end], **TOL),
              f"chunk_mask({start}, {end}) in a chunked prefill: the chunk's rows differ from the dense forward")


def test_phase1_break_prefix(answers: ModuleType) -> None:
    model = make_model(8)
    prompt = torch.randn(8, 8, generator=torch.Generator().manual_seed(2))
    dense_out, _, _ = model.forward_prefill_dense(prompt)
    matching = []
    for start, end in [(0, 3), (3, 6), (6, 8)]:  # the broken way: no cached prefix, a square mask
        out, _, _ = model.forward_prefill_ragged(prompt[start:end], causal_mask(end - start, end - start))
        if torch.allclose(out, dense_out[start:end], **TOL):
            matching.append(start)
    check(matching == [given(answers, "CHUNK_THAT_STILL_MATCHES")],
          "CHUNK_THAT_STILL_MATCHES: which chunk loses nothing when the cached rows before it are forgotten? "
          "python -m demos.demo_break_it --break prefix prints each chunk's error")
