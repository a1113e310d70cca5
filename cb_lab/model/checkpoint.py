"""Load a Llama-architecture checkpoint from a local folder, and save one the same way.

A folder as HF transformers' ``save_pretrained`` writes it (Llama, SmolLM, TinyLlama and the
like): ``config.json``, the weights in ``*.safetensors`` (one file or shards), and optionally
``tokenizer.json``. Nothing is ever downloaded. What cb-lab's ``LlamaModel`` cannot compute
(another architecture, RoPE scaling, biases, an activation other than SiLU) is refused with the
config key that says so, and a missing file or tensor is named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cb_lab.exceptions import ConfigurationError
from cb_lab.model.llama import LlamaModel
from cb_lab.model.llama_config import LlamaConfig
from cb_lab.model.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

__all__ = ["config_from_hf", "config_to_hf", "load_llama", "save_llama"]

ARCHITECTURES = ("LlamaForCausalLM",)


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> LlamaConfig:
    """A ``LlamaConfig`` from the keys of an HF ``config.json``; ConfigurationError names what does not fit."""
    arch = hf.get("architectures") or [hf.get("model_type")]
    if not any(a in ARCHITECTURES or a == "llama" for a in arch):
        raise ConfigurationError(f"{where}: architectures={arch} is not supported; cb-lab loads {ARCHITECTURES}")
    rope = hf.get("rope_parameters") or {}
    checks = {
        "rope_scaling": hf.get("rope_scaling") is None, "rope_parameters.rope_type": rope.get("rope_type", "default")
        == "default", "attention_bias": not hf.get("attention_bias", False), "mlp_bias": not hf.get("mlp_bias", False),
        "hidden_act": hf.get("hidden_act", "silu") == "silu",
    }
    for key, ok in checks.items():
        if not ok:
            raise ConfigurationError(f"{where}: {key} is not supported by cb-lab's LlamaModel")
    try:
        return LlamaConfig(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
            ffn_dim=hf["intermediate_size"], rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), max_position=hf.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), head_dim=hf.get("head_dim"),
        )
    except KeyError as e:
        raise ConfigurationError(f"{where}: the key {e.args[0]!r} is missing") from None


def config_to_hf(
    config: LlamaConfig, bos_token_id: int | None = None, eos_token_id: int | None = None
) -> dict[str, Any]:
    """The ``config.json`` HF transformers reads back as the same model."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.dim, "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "intermediate_size": config.ffn_dim, "head_dim": config.head_size,
        "rope_theta": config.rope_theta, "rms_norm_eps": config.norm_eps, "hidden_act": "silu",
        "max_position_embeddings": config.max_position, "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "torch_dtype": "float32",
    }


def _hf_name(name: str) -> str:
    """cb-lab's parameter name -> the checkpoint's.

    ``layers.0.q_proj.weight`` -> ``model.layers.0.self_attn.q_proj.weight``.
    """
    if name.startswith("lm_head."):
        return name
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        name = name.replace(f".{proj}.", f".self_attn.{proj}.")
    return f"model.{name}"


def load_llama(path: str | Path, *, dtype: torch.dtype = torch.float32) -> tuple[LlamaModel, Tokenizer]:
    """The model in ``path`` and its tokenizer (``tokenizer.json`` if present, else the byte tokenizer)."""
    from safetensors.torch import load_file

    folder = Path(path)
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
