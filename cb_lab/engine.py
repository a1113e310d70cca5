"""``LLMEngine``: text in, text out, on the same scheduler (vLLM's and mini-infer's front door).

::

    engine = LLMEngine.from_pretrained("path/to/checkpoint")        # or LLMEngine(LlamaModel(...))
    outputs = engine.generate(["Hello", "Continuous batching is"], SamplingParams(max_tokens=32))
    outputs[0].text, outputs[0].token_ids, outputs[0].finish_reason

Underneath, every prompt becomes a token-id ``Request`` on one shared ``BlockPool`` (sized by
``EngineConfig.num_blocks``, or by a memory budget), and ``Scheduler.step()`` runs them all:
chunked prefill, decode-first batching, admission and preemption, one fused forward per step.
Drive it yourself with ``add_request`` / ``step`` / ``has_unfinished_requests``, or stream the
text as it grows with ``stream``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import EXECUTORS, Scheduler
from cb_lab.exceptions import ConfigurationError, ValidationError
from cb_lab.model.checkpoint import load_llama
from cb_lab.model.llama import LlamaModel
from cb_lab.model.llama_step import LlamaStepModel
from cb_lab.model.tokenizer import ByteTokenizer, Tokenizer
from cb_lab.progress import ProgressBar
from cb_lab.sampling import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["DTYPES", "EngineConfig", "LLMEngine", "RequestOutput"]

_CACHE_COUNTS = ("prefix_hit_tokens", "admitted_prompt_tokens", "kv_evictions", "kv_copies")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Prompt = str | Sequence[int]


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """The engine's knobs (vLLM's names). ``num_blocks=None`` sizes the pool from ``kv_memory_mb``."""

    max_num_seqs: int = 64  # running requests at most
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None
    kv_memory_mb: float = 64.0  # the K/V budget when num_blocks is None
    max_tokens_per_step: int = 256  # the step's token budget (vLLM's max_num_batched_tokens)
    prefill_chunk_size: int = 64
    dtype: str = "float32"
    executor: str = "fused"
    enable_prefix_caching: bool = True  # requests reuse cached full blocks of a prompt prefix they share

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "block_size", "max_tokens_per_step", "prefill_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"EngineConfig {name} must be an int >= 1, got {value!r}")
        if self.num_blocks is not None and (isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int)
                                            or self.num_blocks < 1):
            raise ConfigurationError(f"EngineConfig num_blocks must be an int >= 1 or None, got {self.num_blocks!r}")
        if not self.kv_memory_mb > 0:
            raise ConfigurationError(f"EngineConfig kv_memory_mb must be > 0, got {self.kv_memory_mb!r}")
        if self.dtype not in DTYPES:
            raise ConfigurationError(f"EngineConfig dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.executor not in EXECUTORS:
            raise ConfigurationError(f"EngineConfig executor must be one of {sorted(EXECUTORS)}, got {self.executor!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ConfigurationError(f"EngineConfig enable_prefix_caching must be a bool, got "
                                     f"{self.enable_prefix_caching!r}")

    def _repr_html_(self) -> str:
        from cb_lab.display.views import config_html  # the views import the engine: imported on use

        return config_html(self)


@dataclass(slots=True)
class RequestOutput:
    """One request's result so far (``finished`` once it has all its tokens)."""

    request_id: str
    prompt: str | list[int]
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "length", "stop" or "abort"
    finished: bool = False
    arrival_time: float = 0.0  # time.perf_counter() when it was added
    token_times: list[float] = field(default_factory=list)  # seconds after arrival, one per token

    @property
    def ttft_s(self) -> float | None:
        """Time to the first token, in seconds."""
        return self.token_times[0] if self.token_times else None


class LLMEngine:
    """A Llama-architecture model, a tokenizer and a scheduler over one shared block pool."""

    def __init__(
        self, model: LlamaModel, tokenizer: Tokenizer | None = None, config: EngineConfig | None = None
    ) -> None:
        self.config = config or EngineConfig()
        self.tokenizer: Tokenizer = tokenizer or ByteTokenizer()
        if self.tokenizer.vocab_size > model.config.vocab_size:
            raise ConfigurationError(f"the tokenizer has {self.tokenizer.vocab_size} ids but the model's vocab_size "
                                     f"is {model.config.vocab_size}")
        self.model = LlamaStepModel(model.to(DTYPES[self.config.dtype]))
        c = self.config
        row_bytes = 2 * self.model.kv_dim * torch.finfo(self.model.dtype).bits // 8  # K and V of one token
        num_blocks = c.num_blocks or max(1, int(c.kv_memory_mb * 2**20) // (row_bytes * c.block_size))
        self.pool = BlockPool(num_blocks, c.block_size, self.model.kv_dim, dtype=self.model.dtype,
                              device=self.model.device)
        self.scheduler = Scheduler(self.model, c.max_tokens_per_step, c.prefill_chunk_size, executor=c.executor,
                                   max_num_seqs=c.max_num_seqs, enable_prefix_caching=c.enable_prefix_caching)
        self.outputs: dict[str, RequestOutput] = {}  # of the requests not finished yet
        self._requests: dict[str, Request] = {}
        self._next_id = 0
        self._counts = dict.fromkeys(_CACHE_COUNTS, 0)  # prefix-cache counts summed over the steps
        logger.info("LLMEngine: %d KV blocks of %d tokens (%.1f MB)", num_blocks, c.block_size,
                    num_blocks * c.block_size * row_bytes / 2**20)

    def __repr__(self) -> str:
        from cb_lab.display.views import engine_text  # the views import the engine: imported on use

        return engine_text(self)

    def _repr_html_(self) -> str:
        from cb_lab.display.views import engine_html

        return engine_html(self)

    @classmethod
    def from_pretrained(cls, path: str | Path, config: EngineConfig | None = None) -> LLMEngine:
        """An engine over the checkpoint folder ``path`` (``load_llama``: nothing is downloaded)."""
        model, tokenizer = load_llama(path)
        return cls(model, tokenizer, config)

    def add_request(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue one prompt (text, or token ids); returns its request id."""
        params = sampling_params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise ValidationError(f"prompt {prompt!r} has no tokens; give at least one")
        request_id = request_id or f"req-{self._next_id}"
        self._next_id += 1
        if request_id in self.outputs:
            raise ValidationError(f"request id {request_id!r} is already used; give another")
        longest = len(ids) + params.max_tokens
        if longest > self.model.model.config.max_position:
            raise ValidationError(f"{request_id}: {len(ids)} prompt tokens + max_tokens {params.max_tokens} exceed "
                                  f"the model's max_position {self.model.model.config.max_position}")
        cache = PagedKVCache(self.config.block_size, pool=self.pool)
        req = Request(request_id, torch.tensor(ids, device=self.model.device), params.max_tokens, cache,
                      sampling=params, eos_token_id=self.tokenizer.eos_token_id)
        self.scheduler.add_request(req)
        self._requests[request_id] = req
        self.outputs[request_id] = RequestOutput(request_id, prompt if isinstance(prompt, str) else list(ids), ids,
                                                 arrival_time=time.perf_counter(), finished=req.finished)
        return request_id

    def _track_forks(self) -> None:
        """Give an output to each sample the scheduler has just forked (``SamplingParams.n``)."""
        for req in self.scheduler.running:
            parent = self.outputs.get(req.parent_id or "")
            if parent is not None and req.req_id not in self._requests:
                self._requests[req.req_id] = req
                self.outputs[req.req_id] = RequestOutput(req.req_id, parent.prompt, parent.prompt_token_ids,
                                                         arrival_time=parent.arrival_time)

    def has_unfinished_requests(self) -> bool:
        return bool(self.scheduler.active)

    def step(self) -> list[RequestOutput]:
        """One scheduler step; the outputs of the requests that got a token or finished in it.

        A finished request is reported once, then the engine forgets it (the caller has its output).
        """
        stats = self.scheduler.step()
        for key in _CACHE_COUNTS:
            self._counts[key] += stats[key]
        self._track_forks()
        now, changed = time.perf_counter(), []
        for request_id, req in list(self._requests.items()):
            out = self.outputs[request_id]
            if len(req.generated_tokens) == len(out.token_ids) and not req.finished:
                continue
            new = [int(t) for t in req.generated_tokens[len(out.token_ids):]]
            out.token_ids += new
            out.token_times += [now - out.arrival_time] * len(new)
            out.text = self.tokenizer.decode(out.token_ids)
            out.finished, out.finish_reason = req.finished, req.finish_reason
            changed.append(out)
            if req.finished:
                del self._requests[request_id], self.outputs[request_id]
        return changed

    def cache_stats(self) -> dict[str, int | float | None]:
        """Prefix caching and forks so far: ``prefill_tokens_saved``, ``prefix_hit_rate`` (of the admitted
        prompt tokens; None before any), ``kv_evictions``, ``kv_copies``."""
        c = self._counts
        admitted = c["admitted_prompt_tokens"]
        return {"prefill_tokens_saved": c["prefix_hit_tokens"],
                "prefix_hit_rate": c["prefix_hit_tokens"] / admitted if admitted else None,
                "kv_evictions": c["kv_evictions"], "kv_copies": c["kv_copies"]}

    def abort(self, request_id: str) -> RequestOutput:
        """Stop a request now (its blocks go back to the pool); returns its output so far."""
        if request_id not in self._requests:
            raise ValidationError(f"no unfinished request {request_id!r}; unfinished: {sorted(self._requests)}")
        self.scheduler.abort(request_id)
        out = self.outputs.pop(request_id)
        del self._requests[request_id]
        out.finished, out.finish_reason = True, "abort"
        return out

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams |
                 Sequence[SamplingParams] | None = None, *, progress: bool | None = None) -> list[RequestOutput]:
        """Run every prompt to the end; outputs in prompt order (``n`` samples: ``n`` outputs, ids
        ``id``, ``id.1``, ...). ``progress``: a bar (None: on a terminal)."""
        batch = _as_batch(prompts)
        params = list(sampling_params) if isinstance(sampling_params, Sequence) else [sampling_params] * len(batch)
        if len(params) != len(batch):
            raise ValidationError(f"{len(params)} sampling params for {len(batch)} prompts; give one or one each")
        ids = [i for p, sp in zip(batch, params) for i in _sample_ids(self.add_request(p, sp), sp)]
        done: dict[str, RequestOutput] = {}
        bar = ProgressBar("generate", len(ids), enabled=progress)
        while len(done) < len(ids):
            done |= {out.request_id: out for out in self.step() if out.finished and out.request_id in ids}
            bar(self.scheduler.step_id, len(done))
        bar.close()
        return [done[i] for i in ids]

    def stream(self, prompts: Prompt | Sequence[Prompt],
               sampling_params: SamplingParams | None = None) -> Iterator[tuple[str, str]]:
        """``(request_id, new text)`` as tokens come, until every prompt is done.

        Text that ends inside a multi-byte character waits for the rest of it.
        """
        ids = [i for p in _as_batch(prompts) for i in _sample_ids(self.add_request(p, sampling_params),
                                                                   sampling_params)]
        shown, finished = dict.fromkeys(ids, ""), set[str]()
        while len(finished) < len(ids):
            for out in self.step():
                if out.finished and out.request_id in shown:
                    finished.add(out.request_id)
                text = out.text if out.finished else out.text.rstrip("\ufffd")
                if out.request_id in shown and len(text) > len(shown[out.request_id]):
                    yield out.request_id, text[len(shown[out.request_id]):]
                    shown[out.request_id] = text


def _sample_ids(request_id: str, params: SamplingParams | None) -> list[str]:
    """The ids of a request's samples: itself, then its forks ``id.1`` ... (``SamplingParams.n``)."""
    n = 1 if params is None or params.max_tokens == 0 else params.n  # nothing drawn: nothing to fork
    return [request_id] + [f"{request_id}.{i}" for i in range(1, n)]


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text, or token ids: a list of ints) or a list of prompts, as a list of prompts."""
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
        return [prompts]  # type: ignore[list-item]
    return list(prompts)  # type: ignore[arg-type]
