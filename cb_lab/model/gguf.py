"""Read a Llama-architecture GGUF file (llama.cpp's format) and write it out as an HF checkpoint folder.

A GGUF file is one binary: key/value metadata (``llama.block_count``, ``tokenizer.ggml.tokens``,
``tokenizer.chat_template``, ...) followed by the tensors, most of them quantized in blocks
(``Q4_1``: 32 weights share a float16 scale and minimum, each weight is 4 bits). The ``gguf``
package (llama.cpp's own reader) parses it and dequantizes every tensor to float32, so cb-lab's
model computes with exactly the numbers HF transformers gets from the same file.

``convert_gguf(path, cache_dir)`` writes what ``load_llama`` reads (``config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json`` with the chat template,
``generation_config.json``) into a folder under ``cache_dir``, once; later loads find it there
and skip the GGUF entirely. The folder is an ordinary HF checkpoint: ``LlamaForCausalLM`` and
``transformers serve`` load it too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cb_lab.exceptions import ConfigurationError
from cb_lab.model.hf_config import config_to_hf
from cb_lab.model.llama_config import LlamaConfig

logger = logging.getLogger(__name__)

__all__ = ["GGUFCheckpoint", "SUPPORTED_TYPES", "cache_folder", "convert_gguf", "read_gguf", "unpermute_rotary_rows"]

CONVERTER_VERSION = 1  # bump when the folder convert_gguf writes changes, so old caches are rebuilt
# Tensor types the loader dequantizes (what llama.cpp's small Llama files use); anything else is refused.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
# GGUF tensor names -> HF's (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
# How text is split before BPE, by ``tokenizer.ggml.pre``. HF's GGUF conversion uses GPT-2's
# byte-level split unless the file names one of these (Llama 3's); so does cb-lab.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values: special tokens, plain added tokens


@dataclass(slots=True)
class GGUFCheckpoint:
    """What a GGUF file holds, in HF's terms: the shape, the float32 weights and the tokenizer."""

    config: LlamaConfig
    tensors: dict[str, torch.Tensor]  # HF names -> float32 weights (Q and K rows back in HF's order)
    tokenizer_json: str  # a ``tokenizers`` byte-level BPE, as tokenizer.json
    special_tokens: dict[str, str | None]  # bos_token, eos_token, unk_token, pad_token
    special_ids: dict[str, int | None]  # bos_token_id, eos_token_id, pad_token_id
    add_bos_token: bool
    chat_template: str | None


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ConfigurationError(f"{path} is not a file; give a .gguf file or a checkpoint folder")


def _open(path: Path) -> Any:
    """``gguf.GGUFReader`` over ``path``; a file it cannot parse is a ConfigurationError that says so."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConfigurationError(f"{path} needs the 'gguf' package: pip install gguf (or make model)") from None
    _check_file(path)
    try:
        return GGUFReader(path)
    # The reader fails with these on a truncated or foreign file (a short read, a reshape that does not fit).
    except (ValueError, IndexError, OSError) as e:
        raise ConfigurationError(f"{path} is not a readable GGUF file (truncated or not GGUF): {e}") from None


def _metadata(reader: Any) -> dict[str, Any]:
    """Every key/value field as plain Python (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def _config(meta: dict[str, Any], names: set[str], where: str) -> LlamaConfig:
    """A ``LlamaConfig`` from the ``llama.*`` keys; what cb-lab's model cannot compute is refused by name."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConfigurationError(f"{where}: general.architecture={arch!r} is not supported; cb-lab loads 'llama'")
    if meta.get("llama.rope.scaling.type", "none") != "none" or "rope_freqs.weight" in names:
        raise ConfigurationError(f"{where}: RoPE scaling is not supported by cb-lab's LlamaModel")
    try:
        n_heads = int(meta["llama.attention.head_count"])
        dim = int(meta["llama.embedding_length"])
        head_dim = int(meta.get("llama.attention.key_length", dim // n_heads))
        if int(meta.get("llama.rope.dimension_count", head_dim)) != head_dim:
            raise ConfigurationError(f"{where}: partial rotary embeddings are not supported by cb-lab's LlamaModel")
        return LlamaConfig(
            vocab_size=int(meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"]))), dim=dim,
            n_layers=int(meta["llama.block_count"]), n_heads=n_heads,
            n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
            ffn_dim=int(meta["llama.feed_forward_length"]),
            rope_theta=float(meta.get("llama.rope.freq_base", 10_000.0)),
            norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
            max_position=int(meta["llama.context_length"]), tie_embeddings="output.weight" not in names,
            head_dim=head_dim if head_dim != dim // n_heads else None,
        )
    except KeyError as e:
        raise ConfigurationError(f"{where}: the metadata key {e.args[0]!r} is missing") from None


def _hf_name(gguf_name: str, where: str) -> str:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".")  # blk.<i>.<name>.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ConfigurationError(f"{where}: the tensor {gguf_name!r} has no place in a Llama model")


def unpermute_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of the Q (or K) projection's rows, per head.

    RoPE rotates pairs of a head's dims. Meta's original Llama (and llama.cpp's kernels) pair
    neighbours, (0, 1), (2, 3), ...; HF's Llama (and cb-lab's ``apply_rope``) pairs each dim with
    the one half a head away, (0, d/2), (1, d/2 + 1), ... The HF-to-GGUF converter permuted the
    rows of Q and K so llama.cpp's neighbour pairs meet the numbers HF's half pairs had: stored row
    ``2j + h`` of a head is HF's row ``h * d/2 + j``. Reading it back, we swap the two axes again.
    ``weight [n_heads * d, D]`` -> the same shape in HF's order.
    """
    d = weight.shape[0] // n_heads
    return weight.reshape(n_heads, d // 2, 2, -1).transpose(1, 2).reshape(weight.shape)


def _tensors(reader: Any, config: LlamaConfig, where: str) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32 under its HF name, Q and K rows in HF's order."""
    from gguf.quants import dequantize

    tensors = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise ConfigurationError(f"{where}: the tensor {t.name!r} is of type {kind}, which cb-lab does not "
                                     f"dequantize; supported: {', '.join(SUPPORTED_TYPES)}")
        name = _hf_name(t.name, where)
        # GGUF lists a 2-D shape as [in, out]; the dequantized array is [out, in], as torch's Linear keeps it.
        weight = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))  # a copy: writable
        if name.endswith("q_proj.weight"):
            weight = unpermute_rotary_rows(weight, config.n_heads)
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rotary_rows(weight, config.n_kv_heads)
        tensors[name] = weight.contiguous()
    return tensors


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: each of the 256 bytes as a printable character (byte-level BPE's tokens)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {b: chr(c) for b, c in [*zip(printable, printable), *zip(extra, range(256, 256 + len(extra)))]}


def _tokenizer_json(meta: dict[str, Any], where: str) -> str:
    """The byte-level BPE the metadata describes, built as HF's GGUF conversion builds it."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConfigurationError(f"{where}: tokenizer.ggml.model={kind!r} is not supported; cb-lab builds "
                                 "byte-level BPE tokenizers ('gpt2')")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token outside the byte alphabet is stored as its UTF-8 text; BPE wants it spelled in bytes.
    vocab = {tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
             for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    split = _PRE_SPLITS.get(meta.get("tokenizer.ggml.pre", ""))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|endoftext|>) are matched whole and are special (dropped by decode);
    # user-defined ones are matched whole and kept. A control token spelled outside the byte alphabet is a
    # mislabel in some files; HF skips it, and so do we.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
                            if k == _CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
                    if k == _USER_DEFINED and t in vocab])
    return str(tok.to_str())


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Parse ``path``: config, float32 weights, tokenizer and chat template. ConfigurationError names what
    cb-lab cannot load (another architecture, a tensor type it does not dequantize, a truncated file)."""
    file = Path(path)
    reader = _open(file)
    where = str(file)
    meta = _metadata(reader)
    config = _config(meta, {t.name for t in reader.tensors}, where)
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ConfigurationError(f"{where}: no tokenizer.ggml.tokens; cb-lab needs the tokenizer in the file")
    ids = {name: meta.get(f"tokenizer.ggml.{key}") for name, key in
           (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id"),
            ("unk_token_id", "unknown_token_id"))}
    specials = {name.removesuffix("_id"): None if i is None else tokens[int(i)] for name, i in ids.items()}
    return GGUFCheckpoint(
        config=config, tensors=_tensors(reader, config, where), tokenizer_json=_tokenizer_json(meta, where),
        special_tokens=specials, special_ids={k: None if v is None else int(v) for k, v in ids.items()},
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def cache_folder(path: str | Path, cache_dir: str | Path) -> Path:
    """Where ``convert_gguf`` keeps ``path``'s conversion: named by the file and a digest of its size,
    its first megabyte and the converter's version, so a changed file or converter gets a new folder."""
    file = Path(path)
    _check_file(file)
    digest = hashlib.blake2b(digest_size=8)
    with file.open("rb") as f:
        digest.update(f.read(2**20))
    digest.update(f"{file.stat().st_size}:{CONVERTER_VERSION}".encode())
    return Path(cache_dir) / f"{file.stem}-{digest.hexdigest()}"


def _write(ckpt: GGUFCheckpoint, folder: Path) -> None:
    from safetensors.torch import save_file

    ids = ckpt.special_ids
    config = config_to_hf(ckpt.config, ids["bos_token_id"], ids["eos_token_id"]) | {"pad_token_id": ids["pad_token_id"]}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}, indent=2))
    (folder / "tokenizer.json").write_text(ckpt.tokenizer_json)
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": ckpt.add_bos_token,
                        "add_eos_token": False, "clean_up_tokenization_spaces": False,
                        "model_max_length": ckpt.config.max_position,
                        **{k: v for k, v in ckpt.special_tokens.items() if v is not None}}
    if ckpt.chat_template is not None:
        tokenizer_config["chat_template"] = ckpt.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    save_file(ckpt.tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def convert_gguf(path: str | Path, cache_dir: str | Path) -> Path:
    """The HF checkpoint folder of the GGUF file ``path``, written under ``cache_dir`` on first use.

    The folder appears whole or not at all (written beside it, then renamed), so an interrupted
    conversion leaves nothing that a later load would trust.
    """
    folder = cache_folder(path, cache_dir)
    if (folder / "config.json").is_file():
        return folder
    ckpt = read_gguf(path)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        _write(ckpt, partial)
        os.replace(partial, folder)
    except OSError as e:  # not a folder, read-only, full: say where, and how to choose another
        shutil.rmtree(partial, ignore_errors=True)
        raise ConfigurationError(f"cannot write the converted model into {cache_dir}: {e.strerror or e}; give "
                                 "a writable cache_dir (or set CB_LAB_CACHE)") from None
    logger.info("converted %s into %s", path, folder)
    return folder
