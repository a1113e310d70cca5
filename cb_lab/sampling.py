"""Sampling a token id from logits, per request, the same whatever the batch.

``SamplingParams`` (vLLM's and mini-infer's name) says how one request picks its tokens: greedy
(``temperature=0``), or from the softmax at a temperature, cut to the ``top_k`` most likely ids
and to the smallest set whose probability reaches ``top_p``. Its random draws never depend on
the schedule: token ``i`` of a request draws from a generator seeded by ``(seed, i)`` alone,
so a request samples the same tokens alone or in a crowd, after a preemption, and when a step
is retried after a fault. It stops at ``max_tokens``, at its EOS (unless ``ignore_eos``) or at
any of ``stop_token_ids``. ``n > 1`` asks for that many samples of one prompt: the prompt is
prefilled once and each further sample is a fork (``Request.fork``) with its own random stream
(``sample_params(i)``).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace

import torch

from cb_lab.exceptions import ConfigurationError

__all__ = ["SamplingParams"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request samples. ``seed=None`` seeds from the request id (still reproducible)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: no cut
    top_p: float = 1.0  # 1.0: no cut
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1  # parallel samples of the prompt: n - 1 forks share its K/V after the prefill

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ConfigurationError(f"SamplingParams max_tokens must be an int >= 0, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < math.inf):
            raise ConfigurationError(f"SamplingParams temperature must be a number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigurationError(f"SamplingParams top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigurationError(f"SamplingParams top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ConfigurationError(f"SamplingParams n must be an int >= 1, got {self.n!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigurationError(f"SamplingParams seed must be an int or None, got {self.seed!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    def _repr_html_(self) -> str:
        from cb_lab.display.views import config_html  # the views import the core: imported on use

        return config_html(self)

    def sample_params(self, index: int) -> SamplingParams:
        """The params of sample ``index`` of ``n``: one sample each, and a seed of its own (``seed + index``)."""
        return replace(self, n=1, seed=None if self.seed is None else self.seed + index)

    def generator(self, req_id: str, index: int) -> torch.Generator:
        """The generator of token ``index``: seeded by ``(seed, index)`` only, never by the batch."""
        seed = self.seed if self.seed is not None else zlib.crc32(req_id.encode())
        return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{index}".encode()))

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, req_id: str, index: int) -> torch.Tensor:
        """Token ``index`` of request ``req_id`` from ``logits [vocab]``: a 0-d int64 tensor."""
        if self.temperature == 0:
            return logits.argmax().to(torch.long)
        scores = logits.float() / self.temperature  # [V]
        if 0 < self.top_k < scores.numel():
            kth = torch.topk(scores, self.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1:
            ordered, order = torch.sort(scores, descending=True)
            probs = torch.softmax(ordered, dim=-1)
            beyond = probs.cumsum(-1) - probs >= self.top_p  # the ids after the nucleus is complete
            scores = scores.scatter(0, order[beyond], float("-inf"))
        probs = torch.softmax(scores, dim=-1).cpu()
        return torch.multinomial(probs, 1, generator=self.generator(req_id, index))[0].to(logits.device)

    def stops(self, token: int, eos_token_id: int | None) -> bool:
        """True when ``token`` ends the request (its EOS, unless ``ignore_eos``, or a stop id)."""
        return token in self.stop_token_ids or (not self.ignore_eos and eos_token_id is not None
                                                and token == eos_token_id)
