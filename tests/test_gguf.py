"""The GGUF loader on small files written here: weights, the rotary row order, the tokenizer, the
chat template, the converted cache folder (which HF transformers loads too), and named errors."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
gguf = pytest.importorskip("gguf")

from gguf_files import CONFIG, TEMPLATE, llama_model, write_gguf  # noqa: E402

from cb_lab import __main__ as main_job  # noqa: E402
from cb_lab.engine import EngineConfig, LLMEngine  # noqa: E402
from cb_lab.exceptions import ConfigurationError, ValidationError  # noqa: E402
from cb_lab.model import registry  # noqa: E402
from cb_lab.model.chat import FALLBACK_CHAT_TEMPLATE, render_chat  # noqa: E402
from cb_lab.model.checkpoint import load_llama  # noqa: E402
from cb_lab.model.gguf import cache_folder, convert_gguf, read_gguf, unpermute_rotary_rows  # noqa: E402
from cb_lab.model.tokenizer import ByteTokenizer, HFTokenizer  # noqa: E402
from cb_lab.sampling import SamplingParams  # noqa: E402

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo the tea"}]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("gguf")
    model = llama_model()
    return {"model": model, "f32": write_gguf(folder / "tiny.gguf", model),
            "q8": write_gguf(folder / "tiny-q8.gguf", model, q8=("blk.0.ffn_up.weight", "token_embd.weight"))}


def test_unpermute_inverts_llama_cpps_permutation() -> None:
    from gguf_files import permute

    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(4 * 8, 3)
    back = unpermute_rotary_rows(torch.from_numpy(permute(w.numpy(), 4)), 4)
    assert torch.equal(back, w)
    assert not torch.equal(torch.from_numpy(permute(w.numpy(), 4)), w)  # the permutation does move rows


def test_read_gguf_gives_back_every_weight_in_hf_order(files: dict[str, Any]) -> None:
    ckpt = read_gguf(files["f32"])
    assert ckpt.config == CONFIG
    model = files["model"]
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embedding: not stored
        key = name if name.startswith("lm_head") else f"model.{name}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            key = key.replace(f".{proj}.", f".self_attn.{proj}.")
        assert torch.equal(ckpt.tensors[key], tensor), name
    assert ckpt.special_ids["bos_token_id"] == 256 and ckpt.special_tokens["eos_token"] == "<|im_end|>"
    assert ckpt.chat_template == TEMPLATE and ckpt.add_bos_token is False


def test_a_loaded_gguf_computes_the_same_logits_and_tokens(files: dict[str, Any], tmp_path: Path) -> None:
    model = files["model"]
    loaded, tokenizer = load_llama(files["f32"], cache_dir=tmp_path)
    ids = torch.tensor([256, 72, 105, 258, 101])
    torch.testing.assert_close(loaded.forward_dense(ids), model.forward_dense(ids), rtol=0, atol=0)
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.eos_token_id == 257


def test_q8_0_tensors_dequantize_as_gguf_does(files: dict[str, Any], tmp_path: Path) -> None:
    ckpt = read_gguf(files["q8"])
    exact = files["model"].layers[0].mlp.up_proj.weight.detach()
    up = ckpt.tensors["model.layers.0.mlp.up_proj.weight"]
    q = gguf.quants.quantize(exact.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert torch.equal(up, torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
    error = (up - exact).abs().max().item()
    assert 0 < error < 0.01 * exact.abs().max().item()  # quantized: close, not equal


def test_the_tokenizer_comes_from_the_metadata(files: dict[str, Any], tmp_path: Path) -> None:
    _, tok = load_llama(files["f32"], cache_dir=tmp_path)
    text = "héllo the <|im_start|>tea"
    ids = tok.encode(text)
    assert ids == [*"héllo".encode(), 258, *b"he ", 256, *b"tea"]  # " t" merged; the control token whole
    assert tok.decode(ids) == "héllo the tea" and tok.decode([*b"a", 258]) == "a t"  # special tokens dropped
    assert tok.encode(text, add_bos=True)[0] == 256


def test_chat_ids_follow_the_template(files: dict[str, Any], tmp_path: Path) -> None:
    _, tok = load_llama(files["f32"], cache_dir=tmp_path)
    text = render_chat(TEMPLATE, CHAT)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhéllo the tea<|im_end|>\n" \
                   "<|im_start|>assistant\n"
    assert tok.apply_chat_template(CHAT) == tok.encode(text, add_bos=False)
    assert tok.apply_chat_template(CHAT, add_generation_prompt=False) == tok.encode(text.removesuffix(
        "<|im_start|>assistant\n"), add_bos=False)


def test_the_converted_folder_is_written_once_and_hf_loads_it(files: dict[str, Any], tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = convert_gguf(files["f32"], tmp_path)
    assert folder == cache_folder(files["f32"], tmp_path)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(files["f32"], tmp_path) == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no partial folder left behind
    hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([256, 72, 105, 258, 101])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids[None]).logits[0], files["model"].forward_dense(ids), rtol=1e-5, atol=1e-5)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    _, ours = load_llama(folder)
    for text in ("héllo the <|im_start|>tea", "  two  spaces\nand\ttabs", "中文 ✓ 🙂"):
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text, add_bos=False), text
    assert hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False) == \
        ours.apply_chat_template(CHAT)


def truncated(source: Path, tmp_path: Path) -> Path:
    data = source.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    return cut


@pytest.mark.parametrize("case, needle", [
    ("truncated", "not a readable GGUF"), ("not-gguf", "not a readable GGUF"),
    ("missing", "neither a file nor a folder"), ("arch", "general.architecture='gpt2' is not supported"),
    ("type", "of type I32"),
])
def test_files_it_cannot_load_get_a_named_error_and_leave_an_engine_untouched(
    case: str, needle: str, files: dict[str, Any], tmp_path: Path
) -> None:
    engine = LLMEngine(llama_model(), config=EngineConfig(num_blocks=32, block_size=4))
    before = engine.generate([[256, 72, 105]], GREEDY)[0].token_ids
    paths = {
        "truncated": lambda: truncated(files["f32"], tmp_path),
        "not-gguf": lambda: (tmp_path / "x.gguf").write_bytes(b"hello" * 50) and tmp_path / "x.gguf",
        "missing": lambda: tmp_path / "nothing.gguf",
        "arch": lambda: write_gguf(tmp_path / "a.gguf", llama_model(), arch="gpt2"),
        "type": lambda: write_gguf(tmp_path / "t.gguf", llama_model(), raw_type={"blk.1.attn_v.weight": 26}),
    }
    with pytest.raises(ConfigurationError, match=needle):
        LLMEngine.from_pretrained(paths[case](), cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("*/config.json"))  # nothing half-converted is cached
    assert engine.generate([[256, 72, 105]], GREEDY)[0].token_ids == before


def test_a_named_model_that_is_not_installed_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.MODELS, "nope", registry.NamedModel("no_such_package_here", "x.gguf", "make model"))
    with pytest.raises(ConfigurationError, match="'nope' is not installed; install it with: make model"):
        load_llama("nope")
    assert registry.resolve_model(Path(__file__).parent) == Path(__file__).parent  # a path is a path


def test_render_chat_checks_messages_and_templates() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    assert render_chat(FALLBACK_CHAT_TEMPLATE, msgs) == "user: hi\nassistant:"
    assert ByteTokenizer().apply_chat_template(msgs) == [256, *b"user: hi\nassistant:"]
    for bad in ([], "hi", [{"role": "user"}], [{"role": "user", "content": 3}], None):
        with pytest.raises(ValidationError, match="conversation|message 0"):
            render_chat(FALLBACK_CHAT_TEMPLATE, bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="refused the conversation: roles must alternate"):
        render_chat("{{ raise_exception('roles must alternate') }}", msgs)
    with pytest.raises(ConfigurationError, match="does not render"):
        render_chat("{% for %}", msgs)


def test_engine_chat_generates_from_the_templated_prompt(files: dict[str, Any], tmp_path: Path) -> None:
    engine = LLMEngine.from_pretrained(files["f32"], EngineConfig(num_blocks=64, block_size=4), cache_dir=tmp_path)
    one = engine.chat(CHAT, GREEDY)
    both = engine.chat([CHAT, CHAT[1:]], GREEDY)
    ids = engine.tokenizer.apply_chat_template(CHAT)
    assert one[0].prompt_token_ids == ids and both[0].token_ids == one[0].token_ids
    assert one[0].token_ids == engine.generate([ids], GREEDY)[0].token_ids
    assert both[1].prompt_token_ids == engine.tokenizer.apply_chat_template(CHAT[1:])
    for bad in ([], "hi", 5):
        with pytest.raises(ValidationError):
            engine.chat(bad)  # type: ignore[arg-type]


def test_generate_chat_and_the_chat_command(files: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CB_LAB_CACHE", str(tmp_path))
    engine = LLMEngine.from_pretrained(files["f32"], cache_dir=tmp_path)
    want = engine.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "tea"}],
                       SamplingParams(max_tokens=5, temperature=0.0))[0]
    assert main_job.main(["generate", "--model", str(files["f32"]), "--chat", "--system", "Be brief.", "tea",
                          "--max-tokens", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["outputs"][0]["token_ids"] == want.token_ids and report["outputs"][0]["prompt"] == "tea"
    monkeypatch.setattr("sys.stdin", io.StringIO("tea\n\n"))
    assert main_job.main(["chat", "--model", str(files["f32"]), "--system", "Be brief.", "--max-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"you> assistant> {want.text}\nyou> ")
    with pytest.raises(SystemExit):
        main_job.main(["generate", "--model", "random", "--system", "x", "hi"])  # --system needs --chat
    assert "--system needs --chat" in capsys.readouterr().err


def test_generate_without_the_real_model_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("cb_lab.cli_generate.model_file", lambda name: None)
    assert main_job.main(["generate", "hi", "--max-tokens", "2", "--json"]) == 0
    captured = capsys.readouterr()
    assert "smollm2-135m-instruct is not installed" in captured.err and "make model" in captured.err
    assert json.loads(captured.out)["model"].startswith("random")


def test_a_cache_dir_it_cannot_write_is_named(files: dict[str, Any], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigurationError, match=f"cannot write the converted model into {blocker}.*CB_LAB_CACHE"):
        load_llama(files["f32"], cache_dir=blocker)


def test_the_chat_goes_on_after_a_turn_it_cannot_answer(files: dict[str, Any], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CB_LAB_CACHE", str(tmp_path))
    monkeypatch.setattr("sys.stdin", io.StringIO("bad \udcff bytes\ntea\n"))
    assert main_job.main(["chat", "--model", str(files["f32"]), "--max-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert "(not answered: the text has an invalid character" in captured.err
    engine = LLMEngine.from_pretrained(files["f32"], cache_dir=tmp_path)
    want = engine.chat([{"role": "user", "content": "tea"}], SamplingParams(max_tokens=3, temperature=0.0))[0]
    assert f"you> you> assistant> {want.text}\nyou> " in captured.out  # the refused turn left no trace
    with pytest.raises(SystemExit):
        main_job.main(["chat", "--model", str(files["f32"]), "--max-tokens", "5000"])
    assert "leaves no room" in capsys.readouterr().err
