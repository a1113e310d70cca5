"""The Llama-architecture model against HF transformers' LlamaForCausalLM, the loader, the tokenizers.

HF builds each reference model from a config with random weights, offline; the library itself
never imports transformers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()

from cb_lab.exceptions import ConfigurationError, ModelError, ValidationError  # noqa: E402
from cb_lab.model.checkpoint import load_llama, save_llama  # noqa: E402
from cb_lab.model.llama import LlamaModel  # noqa: E402
from cb_lab.model.llama_config import LlamaConfig  # noqa: E402
from cb_lab.model.tokenizer import ByteTokenizer, HFTokenizer  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-5}
CONFIGS = {  # HF LlamaConfig keyword arguments
    "gqa-tied": {"num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "mha-untied": {"num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": False},
    "mqa-head_dim-12": {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 12,
                        "tie_word_embeddings": False},
    "gqa-head_dim-6": {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 6, "tie_word_embeddings": True,
                       "rope_theta": 500.0},
}


def hf_model(name: str, seed: int = 0) -> Any:
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=56, num_hidden_layers=3,
                                   max_position_embeddings=256, rms_norm_eps=1e-5, **CONFIGS[name])
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # weights far from the init's near-uniform logits, norms away from 1
        for param_name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in param_name else 0.15 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, LlamaModel]:
    hf = hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    ours, _ = load_llama(folder)
    return hf, ours


def test_logits_equal_hf_transformers(pair: tuple[Any, LlamaModel]) -> None:
    hf, ours = pair
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
    for b in range(2):
        got = ours.forward_dense(ids[b])
        torch.testing.assert_close(got, want[b], **TOL)
    assert float(want.std()) > 0.1, "the reference logits are far from uniform"


def test_a_chunk_on_cached_kv_and_a_ragged_batch_equal_dense(pair: tuple[Any, LlamaModel]) -> None:
    _, model = pair
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 97, (11,), generator=gen), torch.randint(0, 97, (6,), generator=gen)
    dense_a, dense_b = model.forward_dense(a), model.forward_dense(b)
    # a[0:7] first, then a[7:11] on top of its cached K/V: positions 7..10, keys 0..10
    _, k, v = model(a[:7], torch.arange(7), torch.ones(7, 7, dtype=torch.bool).tril())
    past = [(k[i], v[i]) for i in range(model.config.n_layers)]
    mask = torch.arange(11)[None, :] <= torch.arange(7, 11)[:, None]
    logits, _, _ = model(a[7:], torch.arange(7, 11), mask, past)
    torch.testing.assert_close(logits, dense_a[7:], **TOL)
    # a and b side by side in one flat batch, kept apart by the mask
    ids = torch.cat([a, b])
    owner = torch.tensor([0] * 11 + [1] * 6)
    positions = torch.cat([torch.arange(11), torch.arange(6)])
    ragged = (owner[:, None] == owner[None, :]) & (positions[None, :] <= positions[:, None])
    logits, keys, _ = model(ids, positions, ragged)
    torch.testing.assert_close(logits[:11], dense_a, **TOL)
    torch.testing.assert_close(logits[11:], dense_b, **TOL)
    assert tuple(keys.shape) == (model.config.n_layers, 17, model.config.n_kv_heads, model.config.head_size)


def test_a_saved_model_loads_in_hf_and_back(tmp_path: Path) -> None:
    model = LlamaModel(LlamaConfig(vocab_size=258, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48), seed=5)
    save_llama(model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    again, tokenizer = load_llama(tmp_path)
    ids = torch.tensor(ByteTokenizer().encode("continuous batching"))
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
    torch.testing.assert_close(model.forward_dense(ids), want, **TOL)
    torch.testing.assert_close(again.forward_dense(ids), want, **TOL)
    assert isinstance(tokenizer, ByteTokenizer)
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == 257


def test_a_seed_fixes_the_weights() -> None:
    config = LlamaConfig(dim=16, n_heads=2, n_kv_heads=1, ffn_dim=24)
    a, b, c = LlamaModel(config, seed=1), LlamaModel(config, seed=1), LlamaModel(config, seed=2)
    ids = torch.tensor([256, 72, 105])
    assert torch.equal(a.forward_dense(ids), b.forward_dense(ids))
    assert not torch.equal(a.forward_dense(ids), c.forward_dense(ids))


def write_checkpoint(folder: Path, **changes: Any) -> Path:
    save_llama(LlamaModel(LlamaConfig(dim=16, n_heads=2, n_kv_heads=1, ffn_dim=24)), folder)
    config = json.loads((folder / "config.json").read_text()) | changes
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("changes, needle", [
    ({"architectures": ["MistralForCausalLM"]}, "architectures=['MistralForCausalLM']"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters.rope_type"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"vocab_size": None}, "vocab_size"),
    ({"num_key_value_heads": 3}, "n_heads=2 must be a multiple of n_kv_heads=3"),
])
def test_a_checkpoint_cb_lab_cannot_compute_is_refused_by_its_key(tmp_path: Path, changes: dict[str, Any],
                                                                   needle: str) -> None:
    write_checkpoint(tmp_path, **changes)
    with pytest.raises(ConfigurationError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_llama(tmp_path)


def test_missing_files_and_tensors_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="config.json is missing"):
        load_llama(tmp_path)
    folder = write_checkpoint(tmp_path / "ok")
    (folder / "model.safetensors").rename(folder / "weights.bin")
    with pytest.raises(ConfigurationError, match=r"no \*.safetensors"):
        load_llama(folder)
    from safetensors.torch import load_file, save_file

    (folder / "weights.bin").rename(folder / "model.safetensors")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ConfigurationError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        load_llama(folder)


def test_bad_token_ids_and_positions_are_model_errors() -> None:
    model = LlamaModel(LlamaConfig(dim=16, n_heads=2, n_kv_heads=1, ffn_dim=24, max_position=8))
    with pytest.raises(ModelError, match=r"\[0, 258\), got 0..300"):
        model.forward_dense(torch.tensor([0, 300]))
    with pytest.raises(ModelError, match="1-D int64"):
        model.forward_dense(torch.tensor([1.0, 2.0]))
    with pytest.raises(ModelError, match="max_position=8"):
        model.forward_dense(torch.zeros(9, dtype=torch.long))


@pytest.mark.parametrize("kwargs, needle", [
    ({"dim": 0}, "dim"), ({"n_heads": 4, "n_kv_heads": 3}, "multiple"), ({"dim": 30, "n_heads": 4}, "head_dim"),
    ({"head_dim": 7}, "even"), ({"norm_eps": 0.0}, "norm_eps"), ({"tie_embeddings": 1}, "bool"),
])
def test_bad_configs(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigurationError, match=needle):
        LlamaConfig(**kwargs)


@given(st.text())
def test_the_byte_tokenizer_round_trips_any_text(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and all(0 <= i < 256 for i in ids[1:])
    assert tok.decode(ids + [tok.eos_token_id]) == text


def test_byte_tokenizer_refuses_what_is_not_text_or_ids() -> None:
    with pytest.raises(ValidationError, match="bytes"):
        ByteTokenizer().encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="258"):
        ByteTokenizer().decode([65, 999])


def test_a_tokenizer_json_next_to_the_checkpoint_is_used(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "batching": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = write_checkpoint(tmp_path, bos_token_id=1, eos_token_id=2)
    tok.save(str(folder / "tokenizer.json"))
    _, loaded = load_llama(folder)
    assert isinstance(loaded, HFTokenizer) and loaded.vocab_size == 6
    assert loaded.encode("hello batching world") == [1, 3, 5, 4]
    assert loaded.decode([3, 5]) == "hello batching" and loaded.eos_token_id == 2
