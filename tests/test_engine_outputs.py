"""What LLMEngine returns, vLLM-shaped: one RequestOutput per request holding its n CompletionOutputs,
stop strings, min_tokens, penalties and logprobs, each against a dense greedy recompute."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers

from cb_lab.engine import EngineConfig, LLMEngine
from cb_lab.exceptions import ValidationError
from cb_lab.model.llama import LlamaModel
from cb_lab.model.llama_config import LlamaConfig
from cb_lab.model.tokenizer import HFTokenizer
from cb_lab.outputs import CompletionOutput, RequestOutput
from cb_lab.sampling import SamplingParams

VOCAB = 48
PROMPT = "w5 w9 w11 w20 w7"
Process = Callable[[torch.Tensor, list[int], list[int]], torch.Tensor]  # (logits, prompt, output) -> logits


def word_model() -> LlamaModel:
    m = LlamaModel(LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48), seed=3)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # far from the init's near-uniform logits
        for name, p in m.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.3 * noise)
    return m


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    """Words ``w3`` ... ``w47`` (0: unknown, 1: BOS, 2: EOS); text is the words joined by spaces."""
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    tok = RustTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("words") / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer(path, bos_token_id=1, eos_token_id=2)


@pytest.fixture
def engine(tokenizer: HFTokenizer) -> LLMEngine:
    return LLMEngine(word_model(), tokenizer, EngineConfig(max_num_seqs=4, block_size=4, num_blocks=64,
                                                          max_tokens_per_step=10, prefill_chunk_size=3))


def reference(m: LlamaModel, ids: list[int], n: int, process: Process | None = None) -> list[int]:
    """Greedy decoding by dense recompute, the logits changed by ``process`` first."""
    out: list[int] = []
    for _ in range(n):
        logits = m.forward_dense(torch.tensor(ids + out))[-1]
        out.append(int((process(logits, ids, out) if process else logits).argmax()))
    return out


def test_one_output_per_request_with_its_first_sample_as_shortcuts(engine: LLMEngine) -> None:
    ids = engine.tokenizer.encode(PROMPT)  # type: ignore[union-attr]
    out = engine.generate(PROMPT, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    assert isinstance(out, RequestOutput) and out.finished and out.prompt_token_ids == ids
    (c,) = out.outputs
    assert isinstance(c, CompletionOutput) and c.index == 0 and c.finished()
    assert c.token_ids == reference(engine.model.model, ids, 6) and c.finish_reason == "length"
    assert c.text == engine.tokenizer.decode(c.token_ids)  # type: ignore[union-attr]
    assert (c.cumulative_logprob, c.logprobs, c.stop_reason, out.prompt_logprobs) == (None, None, None, None)
    assert (out.text, out.token_ids, out.finish_reason) == (c.text, c.token_ids, c.finish_reason)


def test_zero_tokens_and_n_samples_give_n_empty_completions(engine: LLMEngine) -> None:
    out = engine.generate(PROMPT, SamplingParams(max_tokens=0, n=2))[0]
    assert [(c.index, c.token_ids, c.text, c.finish_reason) for c in out.outputs] == [(0, [], "", "length"),
                                                                                   (1, [], "", "length")]
    assert out.finished and not engine.has_unfinished_requests()


def test_aborting_a_request_aborts_its_samples(engine: LLMEngine) -> None:
    for steps in (0, 1, 3):  # waiting, just forked, decoding
        rid = engine.add_request(PROMPT, SamplingParams(max_tokens=20, n=3, seed=1, ignore_eos=True))
        for _ in range(steps):
            engine.step()
        out = engine.abort(rid)
        assert not engine.has_unfinished_requests() and engine.pool.num_used_blocks == 0
        assert out.finished and [c.finish_reason for c in out.outputs] == ["abort"] * 3
        assert engine.outputs == {} and engine.step() == []
    with pytest.raises(ValidationError, match="no unfinished request 'req-0.1'"):
        engine.abort("req-0.1")


def test_stop_strings_cut_the_text_and_name_the_string(engine: LLMEngine) -> None:
    tok = engine.tokenizer
    assert tok is not None
    want = reference(engine.model.model, tok.encode(PROMPT), 12)
    full = tok.decode(want)
    stop = " " + tok.decode(want[4:5])  # a word after the fourth: it may come earlier too
    ends = next(n for n in range(1, 13) if stop in tok.decode(want[:n]))  # the token that completes it
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=["w999", stop])
    c = engine.generate(PROMPT, params)[0].outputs[0]
    assert c.token_ids == want[:ends], "the token that completes the stop string is the last"
    assert c.text == full[: full.index(stop)] and (c.finish_reason, c.stop_reason) == ("stop", stop)
    kept = engine.generate(PROMPT, SamplingParams(**{**_fields(params), "include_stop_str_in_output": True}))
    assert kept[0].outputs[0].text == full[: full.index(stop) + len(stop)]
    late = engine.generate(PROMPT, SamplingParams(**{**_fields(params), "min_tokens": ends}))[0].outputs[0]
    assert late.token_ids[:ends] == want[:ends] and len(late.token_ids) > ends  # not looked for before
    streamed = "".join(text for _, text in engine.stream(PROMPT, params))
    assert streamed == c.text, "text that may start a stop string is held back, never taken back"


def _fields(params: SamplingParams) -> dict[str, object]:
    return {name: getattr(params, name) for name in params.__dataclass_fields__}


def test_min_tokens_suppresses_the_eos_and_stop_ids(engine: LLMEngine) -> None:
    m = engine.model.model
    ids = engine.tokenizer.encode(PROMPT)  # type: ignore[union-attr]
    want = reference(m, ids, 8)
    stop = want[1]
    early = engine.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop]))[0]
    assert early.token_ids == want[:2] and (early.finish_reason, early.outputs[0].stop_reason) == ("stop", stop)

    def suppress(logits: torch.Tensor, prompt: list[int], out: list[int]) -> torch.Tensor:
        logits = logits.clone()
        if len(out) < 4:
            logits[[stop, 2]] = float("-inf")  # the stop id and the EOS
        return logits

    late = engine.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop],
                                                  min_tokens=4))[0]
    full = reference(m, ids, 8, suppress)
    ends = next((i + 1 for i, t in enumerate(full) if i >= 3 and t in (stop, 2)), 8)  # a stop id or the EOS
    assert late.token_ids == full[:ends] and stop in full[:3] + [want[1]]


@pytest.mark.parametrize("penalties", [{"repetition_penalty": 1.8}, {"frequency_penalty": 1.5},
                                       {"presence_penalty": 2.0, "repetition_penalty": 0.7},
                                       {"frequency_penalty": -0.5, "presence_penalty": 0.8}])
def test_penalties_equal_vllms_formula_on_a_dense_recompute(engine: LLMEngine, penalties: dict[str, float]) -> None:
    p = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, **penalties)  # type: ignore[arg-type]

    def penalize(logits: torch.Tensor, prompt: list[int], out: list[int]) -> torch.Tensor:
        logits = logits.clone()
        for token in set(prompt) | set(out):
            logits[token] = logits[token] / p.repetition_penalty if logits[token] > 0 else (
                logits[token] * p.repetition_penalty)
        for token in set(out):
            logits[token] -= p.frequency_penalty * out.count(token) + p.presence_penalty
        return logits

    ids = engine.tokenizer.encode(PROMPT)  # type: ignore[union-attr]
    plain = engine.generate([PROMPT, "w3 w4"], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    both = engine.generate([PROMPT, "w3 w4"], [p, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)])
    assert both[0].token_ids == reference(engine.model.model, ids, 10, penalize) != plain[0].token_ids
    assert both[1].token_ids == plain[1].token_ids, "a neighbour's penalties change nothing here"


def test_logprobs_are_the_dense_log_softmax_with_ranks_and_text(engine: LLMEngine) -> None:
    m = engine.model.model
    params = SamplingParams(max_tokens=6, temperature=0.9, seed=4, ignore_eos=True, logprobs=3, prompt_logprobs=2,
                            repetition_penalty=1.4, n=2)
    out = engine.generate(PROMPT, params)[0]
    prompt = out.prompt_token_ids
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    for c in out.outputs:
        assert c.logprobs is not None and c.cumulative_logprob is not None and len(c.logprobs) == 6
        lp = torch.log_softmax(m.forward_dense(torch.tensor(prompt + c.token_ids[:-1])), -1)  # [L + 5, V]: raw
        rows = lp[len(prompt) - 1 :]
        for row, token, entry in zip(rows, c.token_ids, c.logprobs):
            best = row.topk(3)
            assert list(entry) == [token, *(t for t in best.indices.tolist() if t != token)][: len(entry)]
            assert entry[token].rank == int((row >= row[token]).sum())
            assert entry[token].decoded_token == engine.tokenizer.decode([token])  # type: ignore[union-attr]
            torch.testing.assert_close(torch.tensor([entry[t].logprob for t in best.indices.tolist()]), best.values)
            torch.testing.assert_close(torch.tensor(entry[token].logprob), row[token])
        assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for e, t in zip(c.logprobs, c.token_ids)))
    for position, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert entry is not None and list(entry)[0] == prompt[position] and len(entry) <= 3
        torch.testing.assert_close(torch.tensor(entry[prompt[position]].logprob), lp[position - 1, prompt[position]])


def test_a_request_id_and_its_samples_ids_are_checked(engine: LLMEngine) -> None:
    engine.add_request(PROMPT, SamplingParams(max_tokens=4, n=3), request_id="a")
    for taken in ("a", "a.1", "a.2"):
        with pytest.raises(ValidationError, match=f"'{taken}' is already used"):
            engine.add_request(PROMPT, request_id=taken)
    engine.add_request(PROMPT, request_id="b.1")
    with pytest.raises(ValidationError, match="'b.1' is already used"):
        engine.add_request(PROMPT, SamplingParams(n=2), request_id="b")
    with pytest.raises(ValidationError, match="logprobs=100 asks for more ids than the vocabulary's 48"):
        engine.add_request(PROMPT, SamplingParams(logprobs=100))


def test_stop_strings_need_a_tokenizer(tmp_path: Path) -> None:
    engine = LLMEngine(word_model())  # a 48-id vocabulary: no tokenizer, token ids only
    with pytest.raises(ValidationError, match="stop strings \\['x'\\] need a tokenizer.*stop_token_ids instead"):
        engine.add_request([3, 4], SamplingParams(stop="x"))
    out = engine.generate([[3, 4]], SamplingParams(max_tokens=3, temperature=0.0, logprobs=1))[0]
    assert out.text == "" and all(e.decoded_token is None for d in out.outputs[0].logprobs or [] for e in d.values())


def test_the_split_executor_gives_the_same_outputs(tokenizer: HFTokenizer) -> None:
    params = SamplingParams(max_tokens=6, temperature=0.7, seed=2, n=2, logprobs=2, prompt_logprobs=1, min_tokens=2,
                            frequency_penalty=0.8, stop=" w9", include_stop_str_in_output=True)
    runs = [LLMEngine(word_model(), tokenizer, EngineConfig(block_size=4, num_blocks=64, max_tokens_per_step=6,
                                                            prefill_chunk_size=3, executor=executor))
            .generate([PROMPT, "w3 w4 w5"], params) for executor in ("fused", "split")]
    for fused, split in zip(*runs):
        assert [c.token_ids for c in fused.outputs] == [c.token_ids for c in split.outputs]
        assert [c.text for c in fused.outputs] == [c.text for c in split.outputs]
        for a, b in zip(fused.outputs, split.outputs):
            assert a.logprobs is not None and b.logprobs is not None
            assert [list(d) for d in a.logprobs] == [list(d) for d in b.logprobs]
            assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-4)
        assert fused.prompt_logprobs is not None and split.prompt_logprobs is not None
        assert [None if d is None else list(d) for d in fused.prompt_logprobs] == [
            None if d is None else list(d) for d in split.prompt_logprobs]


def test_logprobs_survive_preemption(tokenizer: HFTokenizer) -> None:
    prompts = [PROMPT, "w3 w4 w5 w6 w8 w10 w12 w14 w16", "w30 w31", "w40 w41 w42 w43 w44 w45"]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=1, prompt_logprobs=1, n=2)

    def run(num_blocks: int) -> tuple[list[RequestOutput], int]:
        engine = LLMEngine(word_model(), tokenizer, EngineConfig(block_size=2, num_blocks=num_blocks,
                                                                 max_tokens_per_step=8, prefill_chunk_size=3))
        return engine.generate(prompts, params), engine.scheduler.num_preemptions

    (roomy, none), (tight, preempted) = run(200), run(14)
    assert none == 0 and preempted > 0
    for a, b in zip(roomy, tight):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert [[list(d) for d in c.logprobs or []] for c in a.outputs] == [
            [list(d) for d in c.logprobs or []] for c in b.outputs]
        assert a.prompt_logprobs is not None and b.prompt_logprobs is not None
        assert len(a.prompt_logprobs) == len(b.prompt_logprobs) == len(a.prompt_token_ids)
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert x is not None and y is not None and list(x) == list(y)
            assert [v.logprob for v in x.values()] == pytest.approx([v.logprob for v in y.values()], abs=1e-5)
