"""A ``LlamaConfig`` to and from the keys of a Hugging Face ``config.json``.

``hidden_size`` is cb-lab's ``dim``, ``num_key_value_heads`` is ``n_kv_heads``, and so on. What
cb-lab's ``LlamaModel`` cannot compute (another architecture, RoPE scaling, biases, an activation
other than SiLU) is refused with the key that says so. ``checkpoint.py`` (folders) and ``gguf.py``
(GGUF files) both speak through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cb_lab.exceptions import ConfigurationError
from cb_lab.model.llama_config import LlamaConfig

__all__ = ["ARCHITECTURES", "config_from_hf", "config_to_hf", "eos_token_ids", "read_json_object"]

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
            eos_token_ids=eos_token_ids(hf.get("eos_token_id"), where),
        )
    except KeyError as e:
        raise ConfigurationError(f"{where}: the key {e.args[0]!r} is missing") from None


def eos_token_ids(value: Any, where: str) -> tuple[int, ...]:
    """An ``eos_token_id`` as HF writes it (an id, a list of ids, or null) as a tuple of ids, in order."""
    ids = [] if value is None else [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConfigurationError(f"{where}: eos_token_id must be an id, a list of ids or null, got {value!r:.60}")
    return tuple(dict.fromkeys(ids))


def config_to_hf(
    config: LlamaConfig, bos_token_id: int | None = None, eos_token_id: int | None = None
) -> dict[str, Any]:
    """The ``config.json`` HF transformers reads back as the same model. Its ``eos_token_id`` is the
    tokenizer's ``eos_token_id`` and ``config.eos_token_ids``: an id, or a list when there are several."""
    eos = list(dict.fromkeys(([] if eos_token_id is None else [eos_token_id]) + list(config.eos_token_ids)))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.dim, "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "intermediate_size": config.ffn_dim, "head_dim": config.head_size,
        "rope_theta": config.rope_theta, "rms_norm_eps": config.norm_eps, "hidden_act": "silu",
        "max_position_embeddings": config.max_position, "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
        "torch_dtype": "float32",
    }


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; a file that is not one is a ConfigurationError that names it."""
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ConfigurationError(f"{path} is empty; it should hold a JSON object (save the checkpoint again)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigurationError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                                 "save the checkpoint again") from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path} must hold a JSON object of settings, got a {type(data).__name__}")
    return data
