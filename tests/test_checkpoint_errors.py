"""A broken checkpoint folder is refused by name: the file and what is wrong with it, never a raw traceback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cb_lab.engine import LLMEngine
from cb_lab.exceptions import ConfigurationError
from cb_lab.model.checkpoint import load_llama, save_llama
from cb_lab.model.llama import LlamaModel
from cb_lab.model.llama_config import LlamaConfig


def checkpoint(folder: Path) -> Path:
    save_llama(LlamaModel(LlamaConfig(dim=16, n_heads=2, n_kv_heads=1, ffn_dim=24)), folder)
    return folder


def rewrite_tensors(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def poison(name: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name][0, 0] = value

    return change


BROKEN: list[tuple[str, Callable[[Path], None], str]] = [
    ("invalid json", lambda f: (f / "config.json").write_text('{"hidden_size": 16,'), r"config.json.*not valid JSON"),
    ("list config", lambda f: (f / "config.json").write_text("[1, 2]"), r"config.json.*JSON object.*got a list"),
    ("truncated weights", lambda f: truncate(f / "model.safetensors"), r"model.safetensors.*not a readable"),
    ("hidden_size", lambda f: (f / "config.json").write_text(json.dumps(
        json.loads((f / "config.json").read_text()) | {"hidden_size": 32, "head_dim": 16})),
     r"'model.embed_tokens.weight' has shape \(258, 16\).*config.json says \(258, 32\)"),
    ("empty tokenizer", lambda f: (f / "tokenizer.json").write_text(""), r"tokenizer.json.*empty"),
    ("junk tokenizer", lambda f: (f / "tokenizer.json").write_text('{"version": "1.0"}'),
     r"tokenizer.json.*no 'model'"),
    ("nan weight", lambda f: rewrite_tensors(f, poison("model.layers.0.mlp.up_proj.weight", float("nan"))),
     r"'model.layers.0.mlp.up_proj.weight'.*NaN or inf"),
    ("inf weight", lambda f: rewrite_tensors(f, poison("model.embed_tokens.weight", float("inf"))),
     r"'model.embed_tokens.weight'.*NaN or inf"),
    ("bad generation config", lambda f: (f / "generation_config.json").write_text("{"),
     r"generation_config.json.*not valid JSON"),
    ("eos of text", lambda f: (f / "generation_config.json").write_text('{"eos_token_id": "</s>"}'),
     r"generation_config.json: eos_token_id must be an id, a list of ids or null, got '</s>'"),
]


@pytest.mark.parametrize("name, breaks, needle", BROKEN, ids=[b[0] for b in BROKEN])
def test_a_broken_checkpoint_names_the_file_and_the_problem(tmp_path: Path, name: str,
                                                            breaks: Callable[[Path], None], needle: str) -> None:
    folder = checkpoint(tmp_path)
    breaks(folder)
    with pytest.raises(ConfigurationError, match=needle):
        load_llama(folder)
    with pytest.raises(ConfigurationError, match=needle):
        LLMEngine.from_pretrained(folder)
