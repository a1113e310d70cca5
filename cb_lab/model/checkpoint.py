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
from pathlib import Path

import torch

from cb_lab.exceptions import ConfigurationError
from cb_lab.model.gguf import convert_gguf
from cb_lab.model.hf_config import config_from_hf, config_to_hf
from cb_lab.model.llama import LlamaModel
from cb_lab.model.registry import default_cache_dir, resolve_model
from cb_lab.model.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

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


def load_llama(path: str | Path, *, dtype: torch.dtype = torch.float32,
               cache_dir: str | Path | None = None) -> tuple[LlamaModel, Tokenizer]:
    """The model in ``path`` and its tokenizer (``tokenizer.json`` if present, else the byte tokenizer).

    ``path`` is a checkpoint folder, a ``.gguf`` file or a name from ``MODELS``; a GGUF is converted
    into a folder under ``cache_dir`` (default ``default_cache_dir()``) the first time, then read from it.
    """
    from safetensors.torch import load_file

    folder = resolve_model(path)
    if folder.suffix == ".gguf":
        folder = convert_gguf(folder, default_cache_dir() if cache_dir is None else cache_dir)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigurationError(f"{config_file} is missing: a checkpoint folder holds config.json and *.safetensors")
    hf = json.loads(config_file.read_text())
    config = config_from_hf(hf, str(config_file))
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ConfigurationError(f"{folder} has no *.safetensors file; save the weights with safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(load_file(str(shard)))
    model = LlamaModel(config)
    state = {}
    for name in model.state_dict():
        key = "model.embed_tokens.weight" if config.tie_embeddings and name == "lm_head.weight" else _hf_name(name)
        if key not in tensors:
            raise ConfigurationError(f"{folder}: the tensor {key!r} is missing from {[s.name for s in shards]}")
        state[name] = tensors[key]
    model.load_state_dict(state)
    model.to(dtype).eval()
    tokenizer_file = folder / "tokenizer.json"
    tokenizer: Tokenizer = (HFTokenizer(tokenizer_file, hf.get("bos_token_id"), hf.get("eos_token_id"))
                            if tokenizer_file.is_file() else ByteTokenizer())
    return model, tokenizer


def save_llama(model: LlamaModel, path: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` to ``path`` (HF transformers loads it too)."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or ByteTokenizer()
    (folder / "config.json").write_text(json.dumps(config_to_hf(model.config, tok.bos_token_id, tok.eos_token_id),
                                                   indent=2))
    tied = model.config.tie_embeddings
    state = {_hf_name(n): t.detach().contiguous() for n, t in model.state_dict().items()
             if not (tied and n == "lm_head.weight")}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
