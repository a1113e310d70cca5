"""Where one decode step's time goes, op by op: ``torch.profiler`` over an engine's decode steps.

``python -m cb_lab.bench llama`` prints it for each configuration: the prompts are added again,
the engine steps until every request decodes, and then ``steps`` decode steps are timed plainly
(the step's wall time) and ``steps`` more under the profiler (each op's self CPU time, as a share
of all ops' time in those steps). The profiler slows small ops more than big ones, so read the
shares as a picture of where the time goes and the plain timing as the step's cost.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from torch.profiler import ProfilerActivity, profile

from cb_lab.bench.common import now
from cb_lab.engine import LLMEngine
from cb_lab.sampling import SamplingParams

__all__ = ["StepProfile", "print_profile", "profile_decode_steps"]


@dataclass(frozen=True, slots=True)
class StepProfile:
    running: int  # decode rows in the last profiled step
    step_ms: float  # median wall time of a decode step, unprofiled
    shares: list[tuple[str, float]]  # (op, share of the profiled steps' op time), largest first


def profile_decode_steps(engine: LLMEngine, prompts: list[list[int]], steps: int = 10,
                         max_tokens: int = 128) -> StepProfile:
    """Decode steps of ``prompts`` running at once (each makes up to ``max_tokens``: enough for the
    prefill steps and ``2 * steps + 1`` decode steps); every request is aborted afterwards."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    while any(r.in_prefill for r in engine.scheduler.active):
        engine.step()
    engine.step()  # warm-up: every request decodes from here on
    device = engine.model.device
    times = []
    for _ in range(steps):
        start = now(device)
        engine.step()
        times.append(now(device) - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = sorted(((e.key, e.self_cpu_time_total / total) for e in events), key=lambda s: -s[1])
    running = engine.scheduler.last_step["decode_tokens"] if engine.scheduler.last_step else 0
    for request_id in ids:
        if request_id in engine.outputs:
            engine.abort(request_id)
    return StepProfile(running, statistics.median(times) * 1e3, shares)


def print_profile(p: StepProfile, top: int = 8) -> None:
    print(f"where a decode step goes ({p.running} running; {p.step_ms:.1f} ms a step unprofiled; torch.profiler, "
          f"self CPU time of each op):")
    for name, share in p.shares[:top]:
        print(f"  {name:<52} {share:>5.0%}")
    print()
