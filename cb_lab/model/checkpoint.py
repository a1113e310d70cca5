"""Load a Llama-architecture checkpoint from a local folder or GGUF file, and save one the same way.

A folder as HF transformers' ``save_pretrained`` writes it (Llama, SmolLM, TinyLlama and the
like): ``config.json``, the weights in ``*.safetensors`` (one file or shards), and optionally
``tokenizer.json`` (``tokenizer_config.json`` gives its chat template). A ``.gguf`` file, or a
model name from ``cb_lab/model/registry.py``, is converted into such a folder once
(``cb_lab/model/gguf.py``) and loaded from there. Nothing is ever downloaded. What cb-lab's
``LlamaModel`` cannot compute (another architecture, RoPE scaling, biases, an activation other
than SiLU) is refused with the config key that says so, and a missing file or tensor is named.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from cb_lab.exceptions import ConfigurationError
from cb_lab.model.gguf import convert_gguf
from cb_lab.model.hf_config import config_from_hf, config_to_hf, eos_token_ids, read_json_object
from cb_lab.model.llama import LlamaModel
from cb_lab.model.llama_config import LlamaConfig
from cb_lab.model.registry import default_cache_dir, resolve_model
from cb_lab.model.tokenizer import HFTokenizer, Tokenizer, default_tokenizer

__all__ = ["load_llama", "save_llama"]

def _hf_name(name: str) -> str:
    """cb-lab's parameter name -> the checkpoint's.

    ``layers.0.q_proj.weight`` -> ``model.layers.0.self_attn.q_proj.weight``.
    """
    if name.startswith("lm_head."):
        return name
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        name = name.replace(f".{proj}.", f".self_attn.{proj}.")
    return f"model.{name}"


def _read_shards(shards: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            tensors.update(load_file(str(shard)))
        except SafetensorError as e:  # a truncated or overwritten file
            raise ConfigurationError(f"{shard} is not a readable safetensors file ({e}); it may be truncated: "
                                     "copy or save it again") from None
    return tensors


def _checked_state(model: LlamaModel, tensors: dict[str, torch.Tensor], folder: Path,
                   shards: list[Path]) -> dict[str, torch.Tensor]:
    """cb-lab's state dict from the checkpoint's tensors: each present, of the shape config.json implies,
    and finite (a NaN or inf weight would turn every logit into NaN: refused once, here)."""
    tied = model.config.tie_embeddings
    state = {}
    for name, param in model.state_dict().items():
        key = "model.embed_tokens.weight" if tied and name == "lm_head.weight" else _hf_name(name)
        if key not in tensors:
            raise ConfigurationError(f"{folder}: the tensor {key!r} is missing from {[s.name for s in shards]}")
        tensor = tensors[key]
        if tensor.shape != param.shape:
            raise ConfigurationError(f"{folder}: the tensor {key!r} has shape {tuple(tensor.shape)} but config.json "
                                     f"says {tuple(param.shape)}; the config and the weights are of different models")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ConfigurationError(f"{folder}: the tensor {key!r} holds NaN or inf values; the checkpoint is "
                                     "corrupt (or was saved after a diverged training step)")
        state[name] = tensor
    return state


def _with_generation_eos(config: LlamaConfig, folder: Path) -> LlamaConfig:
    """``config`` with the EOS ids of ``generation_config.json`` too (where Llama 3 lists its end-of-turn ids)."""
    file = folder / "generation_config.json"
    if not file.is_file():
        return config
    more = eos_token_ids(read_json_object(file).get("eos_token_id"), str(file))
    return replace(config, eos_token_ids=tuple(dict.fromkeys(config.eos_token_ids + more)))


def _tokenizer(folder: Path, hf: dict[str, Any], config: LlamaConfig) -> Tokenizer | None:
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        return default_tokenizer(config.vocab_size)
    if "model" not in read_json_object(tokenizer_file):
        raise ConfigurationError(f"{tokenizer_file} has no 'model' section, so it is not a tokenizers file; "
                                 "copy tokenizer.json again or remove it")
    eos = config.eos_token_ids[0] if config.eos_token_ids else None  # config.json's first: the tokenizer's own EOS
    return HFTokenizer(tokenizer_file, hf.get("bos_token_id"), eos)


def load_llama(path: str | Path, *, dtype: torch.dtype = torch.float32,
               cache_dir: str | Path | None = None) -> tuple[LlamaModel, Tokenizer | None]:
    """The model in ``path`` and its tokenizer: ``tokenizer.json`` if present, else the byte tokenizer
    when the vocabulary holds its 258 ids, else None (a model of token ids only).

    ``path`` is a checkpoint folder, a ``.gguf`` file or a name from ``MODELS``; a GGUF is converted
    into a folder under ``cache_dir`` (default ``default_cache_dir()``) the first time, then read from it.
    A broken folder (a file that is not JSON or safetensors, weights of another shape than config.json
    says, NaN or inf weights) is a ``ConfigurationError`` that names the file.
    """
    folder = resolve_model(path)
    if folder.suffix == ".gguf":
        folder = convert_gguf(folder, default_cache_dir() if cache_dir is None else cache_dir)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigurationError(f"{config_file} is missing: a checkpoint folder holds config.json and *.safetensors")
    hf = read_json_object(config_file)
    config = _with_generation_eos(config_from_hf(hf, str(config_file)), folder)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ConfigurationError(f"{folder} has no *.safetensors file; save the weights with safetensors")
    model = LlamaModel(config)
    model.load_state_dict(_checked_state(model, _read_shards(shards), folder, shards))
    model.to(dtype).eval()
    return model, _tokenizer(folder, hf, config)


def save_llama(model: LlamaModel, path: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` to ``path`` (HF transformers loads it too)."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or default_tokenizer(model.config.vocab_size)
    bos, eos = (tok.bos_token_id, tok.eos_token_id) if tok is not None else (None, None)
    (folder / "config.json").write_text(json.dumps(config_to_hf(model.config, bos, eos), indent=2))
    tied = model.config.tie_embeddings
    state = {_hf_name(n): t.detach().contiguous() for n, t in model.state_dict().items()
             if not (tied and n == "lm_head.weight")}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
