"""Planning one step: who runs which tokens, who is admitted, who is preempted, and why.

``plan_step`` reads the scheduler's queues and knobs and returns a :class:`StepPlan`; it
changes nothing (the scheduler's commit applies the plan). The budget is spent in the
order the policy says:

==============  ==============================================================
policy          order
==============  ==============================================================
decode_first    decodes, then running prefills, then admissions (FCFS)  (vLLM)
prefill_first   running prefills, then admissions (FCFS), then decodes
sjf             like decode_first, but the requests never admitted shortest job
                first (preempted ones still go first, by arrival)
static          like decode_first, but admit only when nothing runs: a whole
                batch starts together and the next waits until it is done
==============  ==============================================================

Limits: ``max_num_seqs`` running requests; KV blocks of shared pools (a request is
admitted only when its pool can hold its whole prefill). A running request (decode or
prefill chunk) that cannot get a block preempts the running request that arrived last
(``running`` is in arrival order), itself if it is that one, and a victim already scheduled
this step gives back its tokens and blocks: vLLM's recompute preemption; the victim rejoins the
waiting queue ahead of the requests never admitted. No running request ever waits for blocks
a later one holds, so a run finishes whenever each request alone fits its pool; and a step
that had to preempt for blocks admits nobody (as vLLM's scheduler), so it never takes in new
requests only to preempt them next (``prefill_first`` admits before it plans the decodes, so a
decode short of blocks there can preempt in a step that admitted: the thrashing that vLLM's order,
running requests first, avoids). Every request that waits is listed in ``plan.skipped``
with the reason: ``budget``, ``no_blocks``, ``max_num_seqs`` or ``batch_running``.

With ``enable_prefix_caching`` an admission starts after the cached full blocks of its prefill
(``prefix_cache.prefix_hit``); the ledger counts each of them that nobody holds (an evictable
block) as one free block used, and a victim's block another table shares as still in use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cb_lab.checks import check_bool, check_choice, check_int, check_optional_int
from cb_lab.core.block_pool import BlockLedger
from cb_lab.core.plan import PrefillChunk, StepPlan
from cb_lab.core.prefix_cache import block_size_of, prefix_hit
from cb_lab.core.request import Request
from cb_lab.exceptions import ConfigurationError

__all__ = ["POLICIES", "SchedulerConfig", "plan_step"]

POLICIES = ("decode_first", "prefill_first", "sjf", "static")


@dataclass(slots=True)
class SchedulerConfig:
    """The scheduler's settings, checked whenever one is set (the budgets may change between steps)."""

    max_tokens_per_step: int = 8  # rows a step may run: decode tokens + prefill rows
    prefill_chunk_size: int = 4  # prompt rows of one request per step, at most
    max_num_seqs: int | None = None  # running requests, at most
    policy: str = "decode_first"  # in which order the budget is spent (POLICIES)
    enable_chunked_prefill: bool = True  # False: a prefill runs whole or waits
    preempt_every: int | None = None  # force a preemption every N steps, to show and test it
    check_invariants: bool = False  # core/invariants.py after every step: a debug mode
    enable_prefix_caching: bool = False  # an admission starts after the cached full blocks of its prompt

    def __setattr__(self, name: str, value: object) -> None:
        if name not in _SETTING_CHECKS:
            raise ConfigurationError(f"SchedulerConfig has no setting {name!r}; its settings: {list(_SETTING_CHECKS)}")
        object.__setattr__(self, name, _SETTING_CHECKS[name](name, value))


_SETTING_CHECKS: dict[str, Callable[[str, Any], object]] = {
    "max_tokens_per_step": check_int,
    "prefill_chunk_size": check_int,
    "max_num_seqs": check_optional_int,
    "policy": lambda name, value: check_choice(name, value, POLICIES),
    "enable_chunked_prefill": check_bool,
    "preempt_every": check_optional_int,
    "check_invariants": check_bool,
    "enable_prefix_caching": check_bool,
}


class _StepPlanner:
    def __init__(self, config: SchedulerConfig, running: Sequence[Request], turns: dict[str, int]) -> None:
        self.config = config
        self.budget = config.max_tokens_per_step
        self.ledger = BlockLedger()
        self.running = list(running)  # still running this step (victims leave it)
        self.turns = turns
        self.decode: list[Request] = []
        self.prefill: list[PrefillChunk] = []
        self.admitted: list[Request] = []
        self.preempted: list[Request] = []
        self.out_of_blocks = False  # a running request had to preempt another for blocks this step
        self.skipped: dict[str, str] = {}

    def chunk_len(self, req: Request, start: int | None = None) -> int:
        """Rows of ``req``'s prefill from ``start`` (default its ``prefill_pos``) this step can take (0: wait)."""
        remaining = req.prefill_len - (req.prefill_pos if start is None else start)
        if self.config.enable_chunked_prefill:
            return min(self.config.prefill_chunk_size, self.budget, remaining)
        return remaining if remaining <= self.budget else 0  # whole prefills only

    def preempt(self, victim: Request) -> None:
        """``victim`` loses its blocks and its place in this step (vLLM: a scheduled victim is unscheduled)."""
        self.running.remove(victim)
        self.preempted.append(victim)
        self.ledger.give_back(victim.kv_cache)
        if victim in self.decode:
            self.decode.remove(victim)
            self.budget += 1
            self.ledger.unbook(victim.kv_cache, 1)
        for chunk in [c for c in self.prefill if c.request is victim]:
            self.prefill.remove(chunk)
            self.budget += chunk.length
            self.ledger.unbook(victim.kv_cache, chunk.length)

    def make_room(self, req: Request, num_rows: int) -> bool:
        """Book ``num_rows`` rows of ``req``, preempting the running request that arrived last until they fit
        (vLLM's victim: the tail of ``running``, scheduled this step or not); False (nothing booked) if
        ``req`` itself was the victim."""
        while not self.ledger.book(req.kv_cache, num_rows):
            victim = self.running[-1]
            self.preempt(victim)
            self.out_of_blocks = True
            if victim is req:
                return False
        return True

    def schedule_decodes(self) -> None:
        decoders = [r for r in self.running if r.in_decode]
        if len(decoders) > self.budget:  # round robin: the least recently served first
            decoders.sort(key=lambda r: self.turns.get(r.req_id, -1))
        for req in decoders:
            if req in self.preempted:  # made room for an earlier one (a short list: no scan of running)
                continue
            if self.budget == 0:
                self.skipped[req.req_id] = "budget"
            elif self.make_room(req, 1):
                self.decode.append(req)
                self.budget -= 1

    def schedule_prefills(self) -> None:
        for req in [r for r in self.running if r.in_prefill]:
            if req in self.preempted:  # made room for an earlier one (a short list: no scan of running)
                continue
            n = self.chunk_len(req)
            if n == 0:
                self.skipped[req.req_id] = "budget"
            elif self.make_room(req, n):  # like a decode: a running prefill never waits on later requests
                self.add_chunk(req, n)

    def add_chunk(self, req: Request, n: int, cached: tuple[int, ...] = ()) -> None:
        """Schedule ``n`` prefill rows of ``req``, booked already (an admission may start after ``cached`` prefix
        blocks)."""
        start = req.prefill_pos + len(cached) * block_size_of(req)
        self.prefill.append(PrefillChunk(req, start, n, cached))
        self.budget -= n

    def admit(self, waiting: Sequence[Request]) -> None:
        queue = [r for r in waiting if not r.finished]  # a zero-token request just completes
        if self.config.policy == "sjf":  # preempted ones keep their places ahead; the never admitted by their work
            queue.sort(key=lambda r: (1, r.prefill_len + r.max_new_tokens) if r.num_preemptions == 0 else (0, 0))
        blocked = "batch_running" if self.config.policy == "static" and self.running else None
        for req in queue:
            cached = prefix_hit(req) if self.config.enable_prefix_caching and not blocked else ()
            blocked = blocked or self.admission_blocker(req, cached)
            if blocked:  # FCFS: whoever is behind a waiting request waits too (nothing is looked up for them)
                self.skipped[req.req_id] = blocked
                continue
            self.admitted.append(req)
            n = self.chunk_len(req, len(cached) * block_size_of(req))
            self.ledger.take(req.kv_cache, n, cached)
            self.add_chunk(req, n, cached)

    def admission_blocker(self, req: Request, cached: tuple[int, ...] = ()) -> str | None:
        if self.out_of_blocks:  # the pool is short: the requests it has come first
            return "no_blocks"
        start = len(cached) * block_size_of(req)
        limit = self.config.max_num_seqs
        if limit is not None and len(self.running) + len(self.admitted) >= limit:
            return "max_num_seqs"
        if self.chunk_len(req, start) == 0:
            return "budget"
        if not self.ledger.fits(req.kv_cache, req.prefill_len - start, cached):  # room for its whole prefill
            return "no_blocks"
        return None


def plan_step(
    step_id: int, config: SchedulerConfig, running: Sequence[Request], waiting: Sequence[Request],
    turns: dict[str, int], force_preemption: bool = False,
) -> StepPlan:
    """The plan of one step; reads ``running`` / ``waiting`` (priority order) and changes nothing.

    ``turns``: each request's latest decode turn (round robin); ``force_preemption``: preempt the
    decoding request that arrived last.
    """
    p = _StepPlanner(config, running, turns)
    if force_preemption:
        # Only a decoding request: it made a token since its last preemption, so forcing one every
        # step still lets every request finish (a request mid-prefill could be sent back forever).
        victims = [r for r in p.running if r.in_decode]
        if victims:
            p.preempt(victims[-1])
    if config.policy == "prefill_first":
        p.schedule_prefills()
        p.admit(waiting)
        p.schedule_decodes()
    else:
        p.schedule_decodes()
        p.schedule_prefills()
        p.admit(waiting)
    return StepPlan(
        step_id, tuple(p.decode), tuple(p.prefill), tuple(p.admitted), tuple(p.preempted),
        tuple(p.skipped.items()),
    )
