"""A step's plan and its result: plain data between the three phases of a step.

::

    plan   = scheduler.schedule()        # StepPlan: who runs which tokens (reads state only)
    result = executor.run(plan)          # StepResult: new K/V rows and sampled tokens
    scheduler.commit(plan, result)       # the only place a step changes request state

Print a plan to see a step before it runs: ``step 3: decode [a, b] | prefill [c 4:8] (6 tokens)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cb_lab.core.request import Request
from cb_lab.core.view_registry import render
from cb_lab.sampling import LogprobsTensors

__all__ = ["PrefillChunk", "SeqOutput", "StepPlan", "StepResult", "StepStats"]


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Prompt rows ``[start, start + length)`` of ``request``.

    ``cached_blocks``: for a request admitted with a prefix-cache hit, the cached blocks that
    hold its rows ``[0, start)``; the step's commit adopts them into its block table.
    """

    request: Request
    start: int
    length: int
    cached_blocks: tuple[int, ...] = ()

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def completes_prompt(self) -> bool:
        """True when this chunk ends the request's prefill: its last output row is the next token."""
        return self.end == self.request.prefill_len

    def __repr__(self) -> str:
        return f"{self.request.req_id} {self.start}:{self.end}"


@dataclass(frozen=True, slots=True)
class StepPlan:
    """Which requests decode one token, which prefill chunks run, and who joins, leaves or waits."""

    step_id: int
    decode: tuple[Request, ...]
    prefill: tuple[PrefillChunk, ...]
    admitted: tuple[Request, ...] = ()  # move from waiting to running (their chunks are in prefill)
    preempted: tuple[Request, ...] = ()  # lose their K/V; wait again, ahead of requests never admitted
    skipped: tuple[tuple[str, str], ...] = ()  # (req_id, why it waits: budget, no_blocks, max_num_seqs, ...)

    @property
    def requests(self) -> list[Request]:
        """The requests that run: each chunk's, then the decodes (a ``StepResult``'s order)."""
        return [*(chunk.request for chunk in self.prefill), *self.decode]

    @property
    def num_decode_tokens(self) -> int:
        return len(self.decode)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(chunk.length for chunk in self.prefill)

    @property
    def total_tokens(self) -> int:
        return self.num_decode_tokens + self.num_prefill_tokens

    def __repr__(self) -> str:
        decode = ", ".join(r.req_id for r in self.decode)
        prefill = ", ".join(map(repr, self.prefill))
        tokens = f"{self.total_tokens} token" + ("" if self.total_tokens == 1 else "s")
        text = f"step {self.step_id}: decode [{decode}] | prefill [{prefill}] ({tokens})"
        if self.admitted:
            text += " | admitted [" + ", ".join(r.req_id for r in self.admitted) + "]"
        if self.preempted:
            text += " | preempted [" + ", ".join(r.req_id for r in self.preempted) + "]"
        return text

    def _repr_html_(self) -> str:
        return render(self)


class StepStats(dict[str, Any]):
    """What ``Scheduler.step`` returns: a plain dict of the step's figures, plus the plan it ran.

    Everything that reads a dict reads it (``stats["decode_tokens"]``, ``json.dumps``); in a
    notebook it shows the figures and the plan's table: which request got which tokens, why
    the others wait. ``plan`` is None for an idle step.
    """

    __slots__ = ("plan",)

    def __init__(self, figures: dict[str, Any], plan: StepPlan | None = None) -> None:
        super().__init__(figures)
        self.plan = plan

    def _repr_html_(self) -> str:
        return render(self)


@dataclass(frozen=True, slots=True)
class SeqOutput:
    """What compute produced for one request in one step (nothing is stored yet)."""

    k: torch.Tensor  # [n, D] new key rows
    v: torch.Tensor  # [n, D] new value rows
    token: torch.Tensor | None  # [D] sampled token; None for a chunk that does not end the prompt
    logprobs: LogprobsTensors | None = None  # [1, 1 + k]: the token's logprob and the best ids' (when asked)
    prompt_logprobs: LogprobsTensors | None = None  # a chunk's rows whose next prompt token's logprobs were asked


@dataclass(frozen=True, slots=True)
class StepResult:
    """Outputs in plan order: ``prefill[i]`` belongs to ``plan.prefill[i]``, ``decode[j]`` to ``plan.decode[j]``."""

    prefill: tuple[SeqOutput, ...]
    decode: tuple[SeqOutput, ...]
