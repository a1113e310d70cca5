"""``python -m cb_lab.bench fused``: decode steps, the fused executor vs the split one vs a floor.

Decode-only steps of 32 and 128 running requests: the fused executor (one forward per step)
against the split one (one forward per decode token) on identical request sets, next to a
*floor*: the 4 projection matmuls plus one read of every cached K/V row the step attends to.
Also the scheduler's own bookkeeping per step. ``--device cuda`` runs it on a GPU. Shape
letters: B running requests, D model dim.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cb_lab.bench.common import now, ratio
from cb_lab.core.block_pool import BlockPool
from cb_lab.core.executor import EXECUTORS
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.model.tiny_llm import TinyLLM

__all__ = ["add_parser"]


@dataclass(frozen=True, slots=True)
class StepTiming:
    """One step run the way ``Scheduler.step`` runs it, each phase timed (seconds)."""

    schedule_s: float  # schedule()
    forward_s: float  # executor.run(plan): the model
    commit_s: float
    decode_tokens: int
    prefill_tokens: int

    @property
    def step_s(self) -> float:
        return self.schedule_s + self.forward_s + self.commit_s


def timed_steps(args: argparse.Namespace, dim: int) -> int:
    """``--steps`` or by dim: a dim-4096 split step reads 256 MB of weights per decode token."""
    return int(args.steps or (20 if dim <= 256 else 10 if dim <= 1024 else 3))


def timed_step(sched: Scheduler) -> StepTiming:
    device = sched.model.device
    t0 = now(device)
    plan = sched.schedule()
    t1 = now(device)
    result = sched.executor.run(plan)
    t2 = now(device)
    sched._commit(plan, result)  # as step() commits: the planner has booked the plan's blocks
    t3 = now(device)
    return StepTiming(t1 - t0, t2 - t1, t3 - t2, plan.num_decode_tokens, plan.num_prefill_tokens)


def decoding_schedulers(model: TinyLLM, contexts: list[int], args: argparse.Namespace) -> dict[str, Scheduler]:
    """One scheduler per executor over identical requests (prompts of ``contexts`` rows), all decoding.

    The prefill is untimed: one set runs it (fused executor, a big budget), the other set is a
    deep copy of the result (its own requests, caches and shared pool, bitwise equal), which
    halves the slowest untimed part at dim 4096. Each scheduler then gets a fresh executor, so
    ``num_model_calls`` counts the timed steps only.
    """
    budget, extra = len(contexts) + 4096, timed_steps(args, model.dim) + 64  # extra: decodes a request may run
    pool = BlockPool(sum(-(-(n + extra) // args.block_size) for n in contexts), args.block_size, model.dim,
                     device=model.device)
    gen = torch.Generator().manual_seed(args.seed)
    sched = Scheduler(model, budget, max(contexts))
    for i, n in enumerate(contexts):
        prompt = torch.randn(n, model.dim, generator=gen).to(model.device)
        sched.add_request(Request(f"r{i:03d}", prompt, extra, PagedKVCache(args.block_size, pool=pool)))
    while any(r.in_prefill for r in sched.active):
        sched.step()
    assert len(sched.active) == len(contexts), "a request finished during prefill; raise its max_new_tokens"
    twin = Scheduler(model, budget, max(contexts))
    twin.step_id = sched.step_id
    for req in copy.deepcopy(sched.running):
        twin.queues.add(req)  # queued, then running, in the same arrival order
        twin.queues.admit(req)
    scheds = {"split": twin, "fused": sched}
    for name, s in scheds.items():
        s.executor = EXECUTORS[name](model)
    return scheds


@torch.no_grad()
def floor_s(model: TinyLLM, requests: Sequence[Request]) -> tuple[float, float]:
    """Least work of a decode step: ``x [B, D] @ W^T`` for q, k, v, o, plus one gather of every cached row.

    Timed twice (medians of 3): gathering into buffers written beforehand (the floor), and into
    fresh tensors as ``pool.key_cache[0][ids]`` does; a fresh tensor of many MB pays a page fault
    per 4 KiB page on first touch, and the fused step's own gathers are fresh tensors too.
    """
    caches = [r.kv_cache for r in requests if isinstance(r.kv_cache, PagedKVCache)]
    pool = caches[0].pool
    assert pool is not None and len(caches) == len(requests)
    x = torch.stack([r.last_token for r in requests])  # [B, D]
    ids = torch.tensor([b for c in caches for b in c.block_table], device=model.device)
    weights = [p.weight for p in (model.q_proj, model.k_proj, model.v_proj, model.o_proj)]
    key_cache, value_cache = pool.key_cache[0], pool.value_cache[0]  # TinyLLM's one layer: [num_blocks, block_size, D]
    out_k, out_v = (torch.zeros((len(ids), *key_cache.shape[1:]), device=model.device) for _ in range(2))

    def once(fresh: bool) -> float:
        start = now(model.device)
        for w in weights:
            x @ w.T
        if fresh:
            key_cache[ids], value_cache[ids]  # [blocks, block_size, D]: every cached row, read once
        else:
            torch.index_select(key_cache, 0, ids, out=out_k)
            torch.index_select(value_cache, 0, ids, out=out_v)
        return now(model.device) - start

    return statistics.median(once(False) for _ in range(3)), statistics.median(once(True) for _ in range(3))


@dataclass(frozen=True, slots=True)
class FusedRow:
    """Medians over the timed steps of one executor on one configuration."""

    dim: int
    running: int
    context: float  # mean cached rows per request at the first timed step
    gathered: float  # K/V rows attention gathers per cached row (whole blocks: the last one's empty tail)
    executor: str
    steps: int
    decode_tokens: float  # per step
    prefill_tokens: float
    calls: float  # model calls per step
    step_s: float
    forward_s: float
    schedule_s: float
    commit_s: float
    bookkeeping_s: float
    floor_s: float  # gathers into buffers touched beforehand
    fresh_floor_s: float  # gathers into new tensors


def run_fused_config(args: argparse.Namespace, dim: int, running: int) -> dict[str, FusedRow]:
    torch.manual_seed(args.seed)
    model = TinyLLM(dim).to(args.device)
    gen = torch.Generator().manual_seed(args.seed + running)
    contexts = torch.randint(args.contexts[0], args.contexts[1] + 1, (running,), generator=gen).tolist()
    scheds = decoding_schedulers(model, contexts, args)
    for sched in scheds.values():
        timed_step(sched)  # warm-up, untimed
        sched.executor.num_model_calls = 0
    context = statistics.fmean(len(r.kv_cache) for r in scheds["fused"].active)
    gathered = gathered_per_cached_row(scheds["fused"].active)
    timings: dict[str, list[StepTiming]] = {name: [] for name in scheds}
    floors = []
    for _ in range(timed_steps(args, dim)):  # interleaved, so a busy neighbour slows all alike
        floors.append(floor_s(model, scheds["fused"].active))
        for name, sched in scheds.items():
            timings[name].append(timed_step(sched))
    floor = (statistics.median(f for f, _ in floors), statistics.median(f for _, f in floors))
    return {name: _fused_row(dim, running, (context, gathered), name, timings[name],
                             scheds[name].executor.num_model_calls, floor) for name in scheds}


def gathered_per_cached_row(requests: Sequence[Request]) -> float:
    """K/V rows attention gathers per cached row: whole blocks, so the tail of each last block too.

    Both executors gather only the blocks in use (the fused one never pads a block table to the
    longest request), so this is one number for both.
    """
    caches = [r.kv_cache for r in requests if isinstance(r.kv_cache, PagedKVCache)]
    blocks, rows = sum(len(c.block_table) for c in caches), sum(len(c) for c in caches)
    return blocks * caches[0].block_size / rows


def _fused_row(dim: int, running: int, context: tuple[float, float], name: str, ts: list[StepTiming],
               calls: int, floor: tuple[float, float]) -> FusedRow:
    med = statistics.median
    return FusedRow(
        dim, running, *context, name, len(ts), statistics.fmean(t.decode_tokens for t in ts),
        statistics.fmean(t.prefill_tokens for t in ts), calls / len(ts), med(t.step_s for t in ts),
        med(t.forward_s for t in ts), med(t.schedule_s for t in ts), med(t.commit_s for t in ts),
        med(t.schedule_s + t.commit_s for t in ts), *floor,
    )


FUSED_HEADER = (f"{'dim':>5} {'running':>7} {'ctx':>5} {'gather':>6} {'executor':>8} {'steps':>5} {'decode':>6} "
                f"{'prefill':>7} {'calls':>6} {'step ms':>9} {'fwd ms':>9} {'decode tok/s':>12} {'vs split':>8} "
                f"{'floor ms':>9} {'step/floor':>10} {'fresh-floor ms':>14}")


def print_fused(rows: list[dict[str, FusedRow]]) -> None:
    print(FUSED_HEADER)
    for pair in rows:
        for r in pair.values():
            print(f"{r.dim:5d} {r.running:7d} {r.context:5.0f} {r.gathered:5.2f}x {r.executor:>8} {r.steps:5d} "
                  f"{r.decode_tokens:6.0f} {r.prefill_tokens:7.0f} {r.calls:6.1f} {r.step_s * 1e3:9.2f} "
                  f"{r.forward_s * 1e3:9.2f} {ratio(r.decode_tokens, r.step_s):12,.0f} "
                  f"{ratio(pair['split'].step_s, r.step_s):7.2f}x {r.floor_s * 1e3:9.2f} "
                  f"{ratio(r.step_s, r.floor_s):9.2f}x {r.fresh_floor_s * 1e3:14.2f}")
    print("\nscheduler bookkeeping per step (fused executor): schedule() and commit() "
          "vs the model")
    print(f"{'dim':>5} {'running':>7} {'schedule ms':>11} {'commit ms':>9} {'bookkeeping ms':>14} "
          f"{'us/request':>10} {'fwd ms':>9} {'bookkeeping/fwd':>15}")
    for pair in rows:
        r = pair["fused"]
        print(f"{r.dim:5d} {r.running:7d} {r.schedule_s * 1e3:11.3f} {r.commit_s * 1e3:9.3f} "
              f"{r.bookkeeping_s * 1e3:14.3f} {r.bookkeeping_s * 1e6 / r.running:10.1f} {r.forward_s * 1e3:9.2f} "
              f"{ratio(r.bookkeeping_s, r.forward_s):14.2f}x")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def fused_main(args: argparse.Namespace) -> int:
    print(f"cb-lab bench fused: decode-only steps, {args.running} running requests, contexts "
          f"{args.contexts[0]}..{args.contexts[1]} rows (seed {args.seed}), dims {args.dims}, block size "
          f"{args.block_size}; timed steps per dim: {', '.join(f'{d}: {timed_steps(args, d)}' for d in args.dims)} "
          f"(after 1 warm-up, medians); torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {_device_name(args.device)}\n")
    rows = []
    start = time.perf_counter()
    for dim in args.dims:
        for running in args.running:
            rows.append(run_fused_config(args, dim, running))
    print_fused(rows)
    print(f"\nwall time {time.perf_counter() - start:.1f} s (prefill included)")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("fused", help="decode steps: fused vs split executor vs the floor")
    p.add_argument("--dims", type=int, nargs="+", default=[16, 1024, 4096])
    p.add_argument("--running", type=int, nargs="+", default=[32, 128], help="decoding requests per step")
    p.add_argument("--contexts", type=int, nargs=2, default=[64, 512], metavar=("LO", "HI"),
                   help="prompt rows per request, drawn uniformly (default 64 512)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per config (default 20/10/3 by dim)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--device", type=device_arg, default=torch.device("cpu"),
                   help="cpu (default) or cuda: model, pool and prompts live there; timings synchronize")
    p.add_argument("--quick", action="store_true", help="dims 16 and 64, 4 and 8 running, contexts 8..32")
    p.set_defaults(main=fused_main, apply_quick=apply_quick)


def device_arg(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device: {e}") from None
    if device.type not in ("cpu", "cuda") or device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} is not available here; use cpu or an available cuda")
    return device


def apply_quick(args: argparse.Namespace) -> None:
    args.dims, args.running, args.contexts, args.steps = [16, 64], [4, 8], [8, 32], 2
