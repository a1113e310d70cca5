"""``LLMEngine``: text in, text out, on the same scheduler (vLLM's and mini-infer's front door).

::

    engine = LLMEngine.from_pretrained("smollm2-135m-instruct")   # a name, a .gguf or a folder; or LLMEngine(model)
    outputs = engine.generate(["Hello", "Continuous batching is"], SamplingParams(max_tokens=32))
    outputs[0].outputs[0].text, outputs[0].outputs[0].token_ids   # vLLM's shape; outputs[0].text is the same
    engine.chat([{"role": "user", "content": "What is a KV cache?"}])[0].text   # through the chat template

Underneath, every prompt becomes a token-id ``Request`` on one shared ``BlockPool`` (sized by
``EngineConfig.num_blocks``, or by a memory budget), and ``Scheduler.step()`` runs them all:
chunked prefill, decode-first batching, admission and preemption, one fused forward per step.
``OutputProcessor`` turns the tokens into ``RequestOutput`` s (text, stop strings, logprobs, the
``n`` samples of a request under one output). Drive it yourself with ``add_request`` / ``step`` /
``has_unfinished_requests`` / ``abort``, or stream the text as it grows with ``stream``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cb_lab.checks import check_bool, check_choice, check_int, check_optional_int
from cb_lab.core.block_pool import BlockPool
from cb_lab.core.executor import EXECUTORS
from cb_lab.core.kv_cache import PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.display.views import config_html, engine_html, engine_text  # the engine sits above the views
from cb_lab.engine_inputs import Prompt, as_params, as_prompt, as_prompts, check_ids
from cb_lab.exceptions import CBLabException, ConfigurationError, ValidationError
from cb_lab.model.chat import Message
from cb_lab.model.checkpoint import load_llama
from cb_lab.model.llama import LlamaModel
from cb_lab.model.llama_step import LlamaStepModel
from cb_lab.model.tokenizer import Tokenizer, default_tokenizer
from cb_lab.output_processor import OutputProcessor
from cb_lab.outputs import CompletionOutput, RequestOutput
from cb_lab.progress import ProgressBar
from cb_lab.sampling import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["DTYPES", "CompletionOutput", "EngineConfig", "LLMEngine", "RequestOutput"]

_CACHE_COUNTS = ("prefix_hit_tokens", "admitted_prompt_tokens", "kv_evictions", "kv_copies")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
            check_int(f"EngineConfig {name}", getattr(self, name))
        check_optional_int("EngineConfig num_blocks", self.num_blocks)
        if not self.kv_memory_mb > 0:
            raise ConfigurationError(f"EngineConfig kv_memory_mb must be > 0, got {self.kv_memory_mb!r}")
        check_choice("EngineConfig dtype", self.dtype, DTYPES)
        check_choice("EngineConfig executor", self.executor, EXECUTORS)
        check_bool("EngineConfig enable_prefix_caching", self.enable_prefix_caching)

    def _repr_html_(self) -> str:
        return config_html(self)


class LLMEngine:
    """A Llama-architecture model, a tokenizer and a scheduler over one shared block pool."""

    def __init__(
        self, model: LlamaModel, tokenizer: Tokenizer | None = None, config: EngineConfig | None = None
    ) -> None:
        if not isinstance(model, LlamaModel):
            raise ConfigurationError(f"LLMEngine takes a LlamaModel, got {type(model).__name__}; for a checkpoint "
                                     "folder, a .gguf file or a model name use LLMEngine.from_pretrained")
        if config is not None and not isinstance(config, EngineConfig):
            raise ConfigurationError(f"config must be an EngineConfig, got {type(config).__name__}")
        self.config = config or EngineConfig()
        # None: the byte tokenizer if the vocabulary holds it, else no tokenizer (token-id prompts only).
        self.tokenizer = tokenizer if tokenizer is not None else default_tokenizer(model.config.vocab_size)
        if self.tokenizer is not None and self.tokenizer.vocab_size > model.config.vocab_size:
            raise ConfigurationError(f"the tokenizer has {self.tokenizer.vocab_size} ids but the model's vocab_size "
                                     f"is {model.config.vocab_size}")
        # Every id that ends a generation: the tokenizer's EOS and config.json's / generation_config.json's.
        eos = self._eos_token_id
        self.eos_token_ids = frozenset(model.config.eos_token_ids) | ({eos} if eos is not None else set())
        dtype = DTYPES[self.config.dtype]
        # Another dtype means a converted copy: the caller's model stays as it was.
        self.model = LlamaStepModel(model if model.dtype == dtype else copy.deepcopy(model).to(dtype))
        c = self.config
        row_bytes = 2 * self.model.kv_dim * torch.finfo(self.model.dtype).bits // 8  # K and V of one token
        num_blocks = c.num_blocks or max(1, int(c.kv_memory_mb * 2**20) // (row_bytes * c.block_size))
        self.pool = BlockPool(num_blocks, c.block_size, self.model.kv_dim, num_layers=model.config.n_layers,
                              dtype=self.model.dtype, device=self.model.device)
        self.scheduler = Scheduler(self.model, c.max_tokens_per_step, c.prefill_chunk_size, executor=c.executor,
                                   max_num_seqs=c.max_num_seqs, enable_prefix_caching=c.enable_prefix_caching)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._next_id = 0
        self._counts = dict.fromkeys(_CACHE_COUNTS, 0)  # prefix-cache counts summed over the steps
        logger.info("LLMEngine: %d KV blocks of %d tokens (%.1f MB)", num_blocks, c.block_size,
                    num_blocks * c.block_size * row_bytes / 2**20)

    def __repr__(self) -> str:
        return engine_text(self)

    def _repr_html_(self) -> str:
        return engine_html(self)

    @classmethod
    def from_pretrained(cls, path: str | Path, config: EngineConfig | None = None, *,
                        cache_dir: str | Path | None = None) -> LLMEngine:
        """An engine over a checkpoint folder, a ``.gguf`` file or a model name such as
        ``"smollm2-135m-instruct"`` (``load_llama``: nothing is downloaded; a GGUF is converted
        into ``cache_dir`` once)."""
        model, tokenizer = load_llama(path, cache_dir=cache_dir)
        return cls(model, tokenizer, config)

    @property
    def outputs(self) -> dict[str, RequestOutput]:
        """The outputs of the requests not finished yet, by request id."""
        return self.output_processor.outputs

    def add_request(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue one prompt (text, or token ids); returns its request id. Everything is checked
        before it is queued: a ``ValidationError`` leaves the engine as it was."""
        prompt = as_prompt(prompt)
        (params,) = as_params(sampling_params, 1)
        if prompt == "":
            raise ValidationError("the prompt is empty text; give some text (a BOS alone is not a prompt)")
        ids = self._tokenizer_for(prompt).encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValidationError(f"prompt {prompt!r} has no tokens; give at least one")
        if request_id is None:
            while self.output_processor.is_used(f"req-{self._next_id}"):  # skip ids the caller chose themselves
                self._next_id += 1
            request_id = f"req-{self._next_id}"
            self._next_id += 1
        self._check_ids(request_id, params)
        vocab = self.model.model.config.vocab_size
        check_ids(ids, vocab, f"prompt of {request_id}")
        self._check_params(request_id, params, vocab)
        self._check_room(request_id, len(ids), params.max_tokens)
        cache = PagedKVCache(self.config.block_size, pool=self.pool)
        req = Request(request_id, torch.tensor(ids, device=self.model.device), params.max_tokens, cache,
                      sampling=self._with_eos(params), eos_token_id=self._eos_token_id)
        self.scheduler.add_request(req)
        self.output_processor.add_request(req, prompt if isinstance(prompt, str) else list(ids), params)
        return request_id

    def _check_ids(self, request_id: str, params: SamplingParams) -> None:
        """The id, and those its samples will take (``id.1`` ...), are free."""
        taken = [i for i in [request_id, *(f"{request_id}.{j}" for j in range(1, params.n))]
                 if self.output_processor.is_used(i)]
        if taken:
            raise ValidationError(f"request id {taken[0]!r} is already used; give another")

    def _check_params(self, request_id: str, params: SamplingParams, vocab: int) -> None:
        check_ids(params.stop_token_ids, vocab, f"stop_token_ids of {request_id}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > vocab:
                raise ValidationError(f"{request_id}: {name}={k} asks for more ids than the vocabulary's {vocab}; "
                                      f"give at most {vocab}")
        if params.stop and self.tokenizer is None:
            raise ValidationError(f"{request_id}: stop strings {list(params.stop)} need a tokenizer to read the text, "
                                  "and this model has none; give stop_token_ids instead")

    @property
    def _eos_token_id(self) -> int | None:
        return None if self.tokenizer is None else self.tokenizer.eos_token_id

    def _tokenizer_for(self, prompt: str) -> Tokenizer:
        """The tokenizer, for a text prompt; a model without one takes token ids only."""
        if self.tokenizer is None:
            raise ValidationError(f"there is no tokenizer for this model's vocabulary of "
                                  f"{self.model.model.config.vocab_size} ids, so it cannot encode {prompt!r:.40}; "
                                  "pass token ids (a list of ints), or give the model a tokenizer.json")
        return self.tokenizer

    def _with_eos(self, params: SamplingParams) -> SamplingParams:
        """``params`` that also stop at the EOS ids beyond the tokenizer's (unless ``ignore_eos``), as vLLM's
        ``update_from_generation_config`` adds a Llama 3 generation config's end-of-turn ids to the stop ids."""
        more = self.eos_token_ids - {self._eos_token_id} - set(params.stop_token_ids)
        if params.ignore_eos or not more:
            return params
        return replace(params, stop_token_ids=params.stop_token_ids + tuple(sorted(more)))

    def _check_room(self, request_id: str, prompt_len: int, max_tokens: int) -> None:
        """The request fits the model's context and, alone, the block pool."""
        limit = self.model.model.config.max_position
        if prompt_len + max_tokens > limit:
            raise ValidationError(f"{request_id}: {prompt_len} prompt tokens + max_tokens {max_tokens} exceed the "
                                  f"model's context of {limit} tokens; shorten the prompt or lower max_tokens")
        rows = prompt_len + max(max_tokens, 1) - 1  # the last token's K/V is never stored
        need = -(-rows // self.pool.block_size)  # ceil: blocks for every row it may hold
        if need > self.pool.num_blocks:
            raise ValidationError(f"{request_id}: {prompt_len} prompt tokens + max_tokens {max_tokens} need {need} KV "
                                  f"blocks but the pool has {self.pool.num_blocks}; give EngineConfig a larger "
                                  "kv_memory_mb or num_blocks, or lower max_tokens")

    def _add_all(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[str]:
        """Queue every prompt or none: if one is refused, those already queued are aborted. Returns their ids."""
        added: list[str] = []
        try:
            for prompt, sp in zip(prompts, params):
                added.append(self.add_request(prompt, sp))
        except CBLabException:
            for request_id in added:
                self.abort(request_id)
            raise
        return added

    def _abort_unfinished(self, request_ids: Sequence[str]) -> None:
        """Abort what is left of ``request_ids`` (a caller that stopped waiting for them)."""
        for request_id in request_ids:
            if request_id in self.outputs:
                self.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.scheduler.active)

    def step(self) -> list[RequestOutput]:
        """One scheduler step; the outputs of the requests (one per request id, with all its samples) that
        got a token or finished in it.

        A finished request is reported once, then the engine forgets it (the caller has its output).
        A sample whose text has reached a stop string is stopped here, before the next step runs.
        """
        stats = self.scheduler.step()
        for key in _CACHE_COUNTS:
            self._counts[key] += stats[key]
        changed, stopped = self.output_processor.process_outputs(self.scheduler.active)
        for sample_id in stopped:
            self.scheduler.finish_request(sample_id, "stop")
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
        """Stop a request and all its samples now (their blocks go back to the pool); returns its output so far."""
        if request_id not in self.outputs:
            raise ValidationError(f"no unfinished request {request_id!r}; unfinished: {sorted(self.outputs)}")
        for req in [r for r in self.scheduler.active if request_id in (r.req_id, r.parent_id)]:
            self.scheduler.abort(req.req_id)
        return self.output_processor.abort(request_id)

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams |
                 Sequence[SamplingParams] | None = None, *, progress: bool | None = None) -> list[RequestOutput]:
        """Run every prompt to the end; one output per prompt, in prompt order, each with its ``n`` samples
        in ``outputs``. ``progress``: a bar (None: on a terminal)."""
        batch = as_prompts(prompts)
        ids = self._add_all(batch, as_params(sampling_params, len(batch)))
        done: dict[str, RequestOutput] = {}
        bar = ProgressBar("generate", len(ids), enabled=progress)
        try:
            while len(done) < len(ids):
                done |= {out.request_id: out for out in self.step() if out.finished and out.request_id in ids}
                bar(self.scheduler.step_id, len(done))
        finally:  # a step that failed (or a Ctrl-C) leaves no request to run on in a later call
            self._abort_unfinished(ids)
            bar.close()
        return [done[i] for i in ids]

    def chat(self, messages: Sequence[Message] | Sequence[Sequence[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             progress: bool | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of ``{"role", "content"}`` messages) or several (a list of
        such lists): each becomes prompt ids through the tokenizer's chat template, with the
        assistant's header at the end, then ``generate`` runs them all in one batch."""
        return self.generate(self.chat_prompts(messages), sampling_params, progress=progress)

    def chat_prompts(self, messages: Sequence[Message] | Sequence[Sequence[Message]]) -> list[list[int]]:
        """The prompt ids ``chat`` would generate from: one list per conversation."""
        one = isinstance(messages, Sequence) and bool(messages) and isinstance(messages[0], Mapping)
        conversations = [messages] if one else messages
        if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence) or not conversations:
            raise ValidationError(f"chat takes a conversation (a list of message dicts) or a list of them, "
                                  f"got {messages!r:.80}")
        tokenizer = self._tokenizer_for("a chat")
        return [tokenizer.apply_chat_template(c) for c in conversations]  # type: ignore[arg-type]

    def stream(self, prompts: Prompt | Sequence[Prompt],
               sampling_params: SamplingParams | None = None) -> Iterator[tuple[str, str]]:
        """``(id, new text)`` as tokens come, until every prompt is done. With ``n > 1`` each sample
        streams under its own id: the request id for the first, then ``id.1``, ``id.2`` ...

        Text that ends inside a multi-byte character waits for the rest of it (and text that may be
        the start of a stop string, for the next tokens). Leaving the loop early (``break``, or
        closing the iterator) aborts the requests still running.
        """
        batch = as_prompts(prompts)
        ids = self._add_all(batch, as_params(sampling_params, len(batch)))
        shown: dict[str, int] = {}  # sample id -> characters yielded
        finished = set[str]()
        try:
            while len(finished) < len(ids):
                for out in self.step():
                    if out.request_id not in ids:
                        continue
                    if out.finished:
                        finished.add(out.request_id)
                    for c in out.outputs:
                        name = out.request_id if c.index == 0 else f"{out.request_id}.{c.index}"
                        if len(c.text) > shown.get(name, 0):
                            yield name, c.text[shown.get(name, 0):]
                            shown[name] = len(c.text)
        finally:
            self._abort_unfinished(ids)
