"""LLMEngine, the front door: text in, text out, every token equal to a dense greedy recompute."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from cb_lab import __main__ as main_job
from cb_lab.engine import EngineConfig, LLMEngine
from cb_lab.exceptions import ConfigurationError, ValidationError
from cb_lab.model.checkpoint import save_llama
from cb_lab.model.llama import LlamaModel
from cb_lab.model.llama_config import LlamaConfig
from cb_lab.model.tokenizer import ByteTokenizer
from cb_lab.sampling import SamplingParams

PROMPTS = ["Continuous batching", "KV", "paged attention reads blocks", "é à ü", "the scheduler"]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def model(seed: int = 0) -> LlamaModel:
    m = LlamaModel(LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # far from the init's near-uniform logits
        for name, p in m.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.3 * noise)
    return m


def greedy_reference(m: LlamaModel, ids: list[int], n: int) -> list[int]:
    seq, out = torch.tensor(ids), []
    for _ in range(n):
        nxt = m.forward_dense(seq)[-1].argmax()
        out.append(int(nxt))
        seq = torch.cat([seq, nxt[None]])
    return out


@pytest.fixture
def engine() -> LLMEngine:
    return LLMEngine(model(), config=EngineConfig(max_num_seqs=3, block_size=4, num_blocks=64, max_tokens_per_step=12,
                                                  prefill_chunk_size=5))


def test_generate_returns_outputs_in_prompt_order_equal_to_greedy_recompute(engine: LLMEngine) -> None:
    outputs = engine.generate(PROMPTS, GREEDY)
    assert [o.prompt for o in outputs] == PROMPTS
    for out in outputs:
        assert out.prompt_token_ids == engine.tokenizer.encode(out.prompt)  # type: ignore[arg-type]
        assert out.token_ids == greedy_reference(engine.model.model, out.prompt_token_ids, 8)
        assert out.text == engine.tokenizer.decode(out.token_ids) and out.finish_reason == "length"
        assert len(out.token_times) == 8 and out.token_times == sorted(out.token_times) and out.ttft_s is not None
    assert not engine.has_unfinished_requests() and engine.pool.num_used_blocks == 0 and engine.outputs == {}
    assert engine.scheduler.num_finished == len(PROMPTS)


def test_one_at_a_time_equals_all_at_once() -> None:
    together = LLMEngine(model()).generate(PROMPTS, GREEDY)
    alone = [LLMEngine(model()).generate(p, GREEDY)[0] for p in PROMPTS]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def test_driving_it_step_by_step_and_streaming(engine: LLMEngine) -> None:
    first = engine.add_request("hello", GREEDY, request_id="mine")
    assert first == "mine" and engine.has_unfinished_requests()
    seen: list[str] = []
    while engine.has_unfinished_requests():
        seen += [o.request_id for o in engine.step()]
    assert seen.count("mine") == 8  # one report per token; the last one finished
    pieces: dict[str, str] = {}
    for request_id, delta in engine.stream(PROMPTS[:3], GREEDY):
        assert delta
        pieces[request_id] = pieces.get(request_id, "") + delta
    want = LLMEngine(model()).generate(PROMPTS[:3], GREEDY)
    assert sorted(pieces.values()) == sorted(o.text for o in want)


def test_stop_ids_abort_and_zero_tokens(engine: LLMEngine) -> None:
    ids = engine.tokenizer.encode("KV")
    want = greedy_reference(engine.model.model, ids, 8)
    stop = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(want[2],))
    out = engine.generate("KV", stop)[0]
    assert out.token_ids == want[: want.index(want[2]) + 1] and out.finish_reason == "stop"
    assert engine.generate("KV", SamplingParams(max_tokens=0))[0].token_ids == []
    rid = engine.add_request("abort me", GREEDY)
    engine.step()
    aborted = engine.abort(rid)
    assert aborted.finish_reason == "abort" and not engine.has_unfinished_requests()
    assert engine.pool.num_used_blocks == 0
    with pytest.raises(ValidationError, match="no unfinished request"):
        engine.abort(rid)


def test_sampled_generation_is_seeded_per_request() -> None:
    params = [SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=s, ignore_eos=True) for s in (1, 2, 1)]
    a = LLMEngine(model()).generate(["same prompt"] * 3, params)
    assert a[0].token_ids == a[2].token_ids != a[1].token_ids
    b = LLMEngine(model(), config=EngineConfig(max_tokens_per_step=5, prefill_chunk_size=2)).generate(
        ["same prompt"] * 3, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_from_pretrained_and_the_memory_budget(tmp_path: Path) -> None:
    m = model(seed=4)
    save_llama(m, tmp_path)
    engine = LLMEngine.from_pretrained(tmp_path, EngineConfig(block_size=8, kv_memory_mb=1.0))
    row_bytes = 2 * 2 * 2 * 8 * 4  # K and V of a token: 2 layers x 2 kv heads x head_dim 8, float32
    assert engine.pool.num_blocks == 2**20 // (row_bytes * 8)
    out = engine.generate([[256, 72, 105]], GREEDY)[0]  # token ids in, text out
    assert out.token_ids == greedy_reference(m, [256, 72, 105], 8)


def test_bad_requests_and_configs(engine: LLMEngine) -> None:
    with pytest.raises(ValidationError, match="no tokens"):
        engine.add_request([])
    engine.add_request("x", GREEDY, request_id="dup")
    with pytest.raises(ValidationError, match="'dup' is already used"):
        engine.add_request("y", GREEDY, request_id="dup")
    with pytest.raises(ValidationError, match="exceed the model.s context of"):
        engine.add_request("z", SamplingParams(max_tokens=5000))
    with pytest.raises(ValidationError, match="2 sampling params for 3 prompts"):
        engine.generate(["a", "b", "c"], [GREEDY, GREEDY])
    with pytest.raises(ValidationError, match="need 19 KV blocks"):  # 31 ids + 8 tokens - 1, blocks of 2
        LLMEngine(model(), config=EngineConfig(block_size=2, num_blocks=4)).add_request("a" * 30, GREEDY)
    for bad, needle in [({"dtype": "int8"}, "'int8'"), ({"num_blocks": 0}, "num_blocks"),
                        ({"executor": "eager"}, "'eager'"), ({"max_num_seqs": 0}, "max_num_seqs"),
                        ({"kv_memory_mb": 0}, "kv_memory_mb")]:
        with pytest.raises(ConfigurationError, match=needle):
            EngineConfig(**bad)  # type: ignore[arg-type]
    small_vocab = LlamaModel(LlamaConfig(vocab_size=100, dim=16, n_heads=2, n_kv_heads=1, ffn_dim=24))
    with pytest.raises(ConfigurationError, match="258 ids but the model's vocab_size is 100"):
        LLMEngine(small_vocab, ByteTokenizer())
    assert LLMEngine(small_vocab).tokenizer is None  # none given, none that fits: token ids only


# --- python -m cb_lab generate ----------------------------------------------------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main_job.main(["generate", *argv, "--json"]) == 0
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    return data


def test_generate_cli_json_has_one_output_per_prompt_in_order(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    m = model(seed=2)
    save_llama(m, tmp_path / "ckpt")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["hello", [256, 75, 86]]))
    data = run_cli(["--model", str(tmp_path / "ckpt"), "abc", "--prompts", str(prompts), "--max-tokens", "6",
                    "--ignore-eos"], capsys)
    outs = data["outputs"]
    assert [o["prompt"] for o in outs] == ["abc", "hello", [256, 75, 86]]
    tok = ByteTokenizer()
    for o, ids in zip(outs, [tok.encode("abc"), tok.encode("hello"), [256, 75, 86]]):
        assert o["token_ids"] == greedy_reference(m, ids, 6) and o["finish_reason"] == "length"
        assert o["text"] == tok.decode(o["token_ids"])
    assert data["tokens_per_s"] > 0 and data["steps"] > 0


def test_generate_cli_samples_by_seed_with_the_random_model(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "random", "x", "x", "--temperature", "1.0", "--seed", "5", "--quick", "--ignore-eos"]
    a, b = run_cli(argv, capsys), run_cli(argv, capsys)
    assert a["outputs"] == [dict(o, ttft_s=a["outputs"][i]["ttft_s"]) for i, o in enumerate(b["outputs"])]
    assert all(len(o["token_ids"]) == 8 for o in a["outputs"])  # --quick: at most 8 tokens
    assert "random" in a["model"]
    assert main_job.main(["generate", "--model", "random", "plain", "--quick"]) == 0
    assert "tokens/s" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    ([], "give prompts"), (["--model", "/nonexistent/ckpt", "x"], "neither a file nor a folder"),
    (["--model", "random", "x", "--temperature", "-1"], "temperature"),
])
def test_generate_cli_usage_errors(argv: list[str], needle: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main_job.main(["generate", *argv])
    assert info.value.code == 2 and needle in capsys.readouterr().err


def test_generate_cli_refuses_a_bad_prompts_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(SystemExit):
        main_job.main(["generate", "--prompts", str(bad)])
    assert "JSON list of strings" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("[\"unclosed")
    for path in (tmp_path / "missing.json", tmp_path / "broken.json"):  # a usage error that names it, no traceback
        with pytest.raises(SystemExit) as info:
            main_job.main(["generate", "--prompts", str(path)])
        assert info.value.code == 2 and f"--prompts {path}" in capsys.readouterr().err


def test_a_bfloat16_engine_keeps_its_pool_in_bfloat16() -> None:
    engine = LLMEngine(model(), config=EngineConfig(dtype="bfloat16", num_blocks=32, block_size=4))
    outs = engine.generate(PROMPTS[:2], GREEDY)
    assert engine.pool.key_cache.dtype == torch.bfloat16 and engine.model.dtype == torch.bfloat16
    assert all(len(o.token_ids) == 8 for o in outs) and engine.pool.num_used_blocks == 0


def test_the_engine_caches_prefixes_by_default_and_counts_what_it_saved() -> None:
    system = "You are a helpful assistant. "  # BOS + 29 bytes: 7 full blocks of 4, and 2 tokens over
    on = LLMEngine(model(), config=EngineConfig(block_size=4, num_blocks=64))
    off = LLMEngine(model(), config=EngineConfig(block_size=4, num_blocks=64, enable_prefix_caching=False))
    for engine in (on, off):
        first = engine.generate(system + "Hi", GREEDY)  # its blocks are cached once it has run
        rest = engine.generate([system + "KV?", system + "Bye"], GREEDY)
        assert [o.token_ids for o in first + rest] == [greedy_reference(model(), ByteTokenizer().encode(p), 8)
                                                       for p in (system + "Hi", system + "KV?", system + "Bye")]
    assert off.cache_stats() == {"prefill_tokens_saved": 0, "prefix_hit_rate": 0.0, "kv_evictions": 0,
                                 "kv_copies": 0}
    saved = on.cache_stats()["prefill_tokens_saved"]
    assert saved == 2 * 28  # both later prompts take the 7 cached blocks of the system prompt
    prompt_tokens = sum(len(ByteTokenizer().encode(p)) for p in (system + "Hi", system + "KV?", system + "Bye"))
    assert on.cache_stats()["prefix_hit_rate"] == pytest.approx(saved / prompt_tokens)


def test_generate_cli_n_samples_and_the_cache_stats(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_cli(["--model", "random", "same prompt", "other", "--n", "2", "--temperature", "1.0", "--quick",
                    "--ignore-eos", "--block-size", "4"], capsys)
    assert [o["request_id"] for o in data["outputs"]] == ["req-0", "req-0.1", "req-1", "req-1.1"]
    assert [o["prompt"] for o in data["outputs"]] == ["same prompt", "same prompt", "other", "other"]
    assert data["outputs"][0]["token_ids"] != data["outputs"][1]["token_ids"]  # seeds 0 and 1
    assert {"prefill_tokens_saved", "prefix_hit_rate"} <= set(data)
    # One request at a time: the second prompt is admitted after the first has cached its 16-token prefix.
    shared = ["--model", "random", "shared prefix: one", "shared prefix: two", "--quick", "--max-num-seqs", "1",
              "--block-size", "4"]
    assert run_cli(shared, capsys)["prefill_tokens_saved"] == 16
    assert run_cli([*shared, "--no-prefix-caching"], capsys)["prefill_tokens_saved"] == 0


@pytest.mark.parametrize("where", ["config.json", "generation_config.json"])
def test_a_list_of_eos_ids_stops_at_any_of_them(tmp_path: Path, where: str) -> None:
    m = model(seed=4)
    save_llama(m, tmp_path)
    ids = ByteTokenizer().encode("KV")
    want = greedy_reference(m, ids, 8)
    stop_at = next(i for i, t in enumerate(want) if t != 257 and i >= 2)
    file = tmp_path / where
    settings = json.loads(file.read_text()) if file.is_file() else {}
    file.write_text(json.dumps(settings | {"eos_token_id": [257, want[stop_at]]}))  # Llama 3 style
    engine = LLMEngine.from_pretrained(tmp_path)
    assert {257, want[stop_at]} <= engine.eos_token_ids
    out = engine.generate([ids], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert out.token_ids == want[: want.index(want[stop_at]) + 1] and out.finish_reason == "stop"
    ignored = engine.generate([ids], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert ignored.token_ids == want and ignored.finish_reason == "length"


def test_a_checkpoint_without_a_tokenizer_takes_token_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = LlamaModel(LlamaConfig(vocab_size=256, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=48), seed=1)
    save_llama(m, tmp_path / "ckpt")  # a byte-level model's plain save: config.json + weights, no tokenizer.json
    assert not (tmp_path / "ckpt" / "tokenizer.json").exists()
    engine = LLMEngine.from_pretrained(tmp_path / "ckpt")
    assert engine.tokenizer is None
    out = engine.generate([[72, 105, 33]], GREEDY)[0]
    assert out.token_ids == greedy_reference(m, [72, 105, 33], 8) and out.text == ""
    with pytest.raises(ValidationError, match="no tokenizer for this model's vocabulary of 256 ids.*pass token ids"):
        engine.generate("Hi", GREEDY)
    with pytest.raises(ValidationError, match="no tokenizer"):
        engine.chat([{"role": "user", "content": "Hi"}])
    prompts = tmp_path / "ids.json"
    prompts.write_text(json.dumps([[72, 105, 33], [1, 2]]))
    data = run_cli(["--model", str(tmp_path / "ckpt"), "--prompts", str(prompts), "--max-tokens", "4"], capsys)
    assert [o["token_ids"] for o in data["outputs"]] == [greedy_reference(m, p, 4) for p in ([72, 105, 33], [1, 2])]
