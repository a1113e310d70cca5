"""LLMEngine's door: bad input is refused by name before anything is queued, a call adds all its
prompts or none, and a caller that stops waiting (an early break, a failed step) leaves nothing running."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cb_lab.engine import EngineConfig, LLMEngine
from cb_lab.exceptions import CBLabException, ConfigurationError, ValidationError
from cb_lab.model.llama import LlamaModel
from cb_lab.model.llama_config import LlamaConfig
from cb_lab.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def model() -> LlamaModel:
    return LlamaModel(LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=48), seed=3)


@pytest.fixture
def engine() -> LLMEngine:
    return LLMEngine(model(), config=EngineConfig(num_blocks=16, block_size=4, max_num_seqs=4))


def untouched(engine: LLMEngine) -> bool:
    return not engine.has_unfinished_requests() and engine.outputs == {} and engine.pool.num_used_blocks == 0


@pytest.mark.parametrize("prompts, params, needle", [
    ([[1, 2, 300]], GREEDY, "token id 300 is outside the model's vocabulary"),
    ([[1, 2], [3, 4], [9999]], GREEDY, "token id 9999"),  # the third of three: none is queued
    ([{"role": "user", "content": "hi"}], GREEDY, "chat messages go to LLMEngine.chat"),
    (None, GREEDY, "prompts must be"), (5, GREEDY, "prompts must be"), (b"hi", GREEDY, "prompts must be"),
    (torch.tensor([1, 2]), GREEDY, "prompts must be"), ([[1.5, 2.7]], GREEDY, "list of int token ids"),
    ([[True, 1]], GREEDY, "list of int token ids"), (["hi", 3], GREEDY, "prompt 1 must be text"),
    (["hi"], {"max_tokens": 3}, "must be a SamplingParams"), (["hi"], "greedy", "must be a SamplingParams"),
    (["hi", "yo"], [GREEDY], "1 sampling params for 2 prompts"),
    (["hi"], SamplingParams(max_tokens=4, stop_token_ids=(258,)), "stop_token_ids of req-.*: token id 258"),
    (["a\udcff"], GREEDY, "invalid character"), (["ok", ""], GREEDY, "the prompt is empty text"),
    (["x" * 20], SamplingParams(max_tokens=60), "need 20 KV blocks but the pool has 16"),
    (["x"], SamplingParams(max_tokens=5000), "exceed the model's context of 2048"),
])
def test_bad_input_is_named_and_leaves_the_engine_usable(engine: LLMEngine, prompts: Any, params: Any,
                                                         needle: str) -> None:
    want = engine.generate(["ok"], GREEDY)[0].token_ids
    for call in (engine.generate, engine.stream):
        with pytest.raises(ValidationError, match=needle):
            list(call(prompts, params))  # type: ignore[operator]
        assert untouched(engine)
    assert engine.generate(["ok"], GREEDY)[0].token_ids == want


def test_add_request_takes_one_prompt_and_nothing_else(engine: LLMEngine) -> None:
    for bad in (5, None, [1.5], {"role": "user", "content": "hi"}, b"hi"):
        with pytest.raises(ValidationError, match="the prompt"):
            engine.add_request(bad)  # type: ignore[arg-type]
        assert untouched(engine)


def test_bad_constructor_arguments_are_named() -> None:
    with pytest.raises(ConfigurationError, match="takes a LlamaModel.*from_pretrained"):
        LLMEngine("path/to/model")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="must be an EngineConfig"):
        LLMEngine(model(), config={"max_num_seqs": 2})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="stop_token_ids must be a list"):
        SamplingParams(stop_token_ids=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="a model is a name"):
        LLMEngine.from_pretrained(None)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="neither a file nor a folder, nor a model name .smollm2"):
        LLMEngine.from_pretrained("smollm2-135m-instructX")


def test_leaving_a_stream_early_aborts_its_requests(engine: LLMEngine) -> None:
    alone = engine.generate(["Hi"], GREEDY)[0].token_ids
    stream = engine.stream(["A", "B"], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    next(stream)
    stream.close()  # what a `break` out of the loop does, once the iterator is dropped
    assert untouched(engine)
    assert engine.generate(["Hi"], GREEDY)[0].token_ids == alone  # nothing else ran inside this call


def test_a_failed_step_leaves_no_request_behind(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise CBLabException("injected")

    monkeypatch.setattr(engine.scheduler, "step", fail)
    with pytest.raises(CBLabException, match="injected"):
        engine.generate(["a", "b"], GREEDY)
    monkeypatch.undo()
    assert untouched(engine)


def test_tiny_temperatures_are_greedy(engine: LLMEngine) -> None:
    greedy = engine.generate(["abc"], GREEDY)[0].token_ids
    tiny = engine.generate(["abc"], SamplingParams(max_tokens=4, temperature=1e-45, ignore_eos=True))
    assert tiny[0].token_ids == greedy


def test_automatic_ids_skip_the_ones_callers_chose(engine: LLMEngine) -> None:
    engine.add_request("a", GREEDY, request_id="req-0")
    assert engine.add_request("b", GREEDY) == "req-1"


def test_another_dtype_converts_a_copy_not_the_callers_model() -> None:
    m = model()
    engine = LLMEngine(m, config=EngineConfig(num_blocks=16, block_size=4, dtype="bfloat16"))
    assert m.dtype == torch.float32 and engine.model.dtype == torch.bfloat16
    assert engine.generate(["hi"], GREEDY)[0].finish_reason == "length"


def test_decode_refuses_ids_it_does_not_know(engine: LLMEngine) -> None:
    for bad in ([-1], [300], "abc", [1.5]):
        with pytest.raises(ValidationError):
            engine.tokenizer.decode(bad)  # type: ignore[arg-type]
