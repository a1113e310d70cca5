"""Small GGUF files written the way llama.cpp's converter writes a Llama, for the loader's tests.

The weights come from a seeded cb-lab ``LlamaModel``; Q and K rows are permuted as
``convert_hf_to_gguf.py`` permutes them, so reading them back must undo it exactly. The
tokenizer is byte-level: the 256 byte characters, one merge, and two control tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

gguf = __import__("pytest").importorskip("gguf")

from cb_lab.model.gguf import _bytes_to_unicode  # noqa: E402
from cb_lab.model.llama import LlamaModel  # noqa: E402
from cb_lab.model.llama_config import LlamaConfig  # noqa: E402

CONFIG = LlamaConfig(vocab_size=259, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, rope_theta=500.0,
                     norm_eps=2.0**-17)  # GGUF stores float32: an eps it holds exactly
BYTES = [_bytes_to_unicode()[b] for b in range(256)]  # token i is byte i
TOKENS = [*BYTES, "<|im_start|>", "<|im_end|>", "Ġt"]  # 256 bytes, two control tokens, one merge (" t")
TYPES = [1] * 256 + [3, 3, 1]
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "q_proj": "attn_q",
               "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_model(seed: int = 0) -> LlamaModel:
    """A small model whose logits are far from uniform (so a wrong weight shows)."""
    m = LlamaModel(CONFIG, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen) if "norm" in name
                    else 0.3 * torch.randn(p.shape, generator=gen))
    return m


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: HF's half-split rotary rows -> interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(name: str) -> str:
    """cb-lab's parameter name -> llama.cpp's tensor name."""
    top = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    _, i, rest = name.split(".", 2)
    module = rest.removesuffix(".weight")
    return f"blk.{i}.{LAYER_NAMES[module]}.weight"


def write_gguf(path: Path, model: LlamaModel, *, arch: str = "llama", q8: tuple[str, ...] = (),
               raw_type: dict[str, int] | None = None) -> Path:
    """Write ``model`` as a GGUF file; tensors named in ``q8`` are stored as Q8_0, ``raw_type`` forces a type."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_position)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.ffn_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_dimension_count(c.head_size)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types(TYPES)
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    state = model.state_dict()
    for name, tensor in state.items():
        if c.tie_embeddings and name == "lm_head.weight":
            continue  # tied: llama.cpp writes no output.weight
        data = tensor.numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            data = permute(data, c.n_heads)
        elif name.endswith("k_proj.weight"):
            data = permute(data, c.n_kv_heads)
        target = gguf_name(name)
        if target in q8:
            w.add_tensor(target, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif raw_type and target in raw_type:
            w.add_tensor(target, data.view(np.int32), raw_dtype=gguf.GGMLQuantizationType(raw_type[target]))
        else:
            w.add_tensor(target, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
