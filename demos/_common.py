"""Helpers the demos share: a seeded model, random requests, an ASCII mask grid, a diff format."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from cb_lab.core.kv_cache import BaseKVCache, DenseKVCache
from cb_lab.core.request import Request
from cb_lab.model.tiny_llm import TinyLLM


def demo_parser(description: str | None) -> argparse.ArgumentParser:
    """An argparse parser with the two flags every demo has: ``--quick`` and ``--seed``."""
    parser = argparse.ArgumentParser(description=(description or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller workload (runs in well under 2 s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the model weights and the prompts")
    return parser


def make_model(dim: int, seed: int) -> TinyLLM:
    """A TinyLLM whose weights depend only on ``seed``."""
    torch.manual_seed(seed)
    return TinyLLM(dim=dim)


def make_request(
    req_id: str, prompt_len: int, max_new_tokens: int, dim: int, cache: BaseKVCache | None = None
) -> Request:
    """A request with a random ``[prompt_len, dim]`` prompt (from torch's global RNG)."""
    prompt = torch.randn(prompt_len, dim)
    return Request(req_id, prompt, max_new_tokens, cache if cache is not None else DenseKVCache())


def mask_grid(mask: torch.Tensor, labels: Sequence[tuple[str, int]]) -> str:
    """Draw a square bool mask: ``x`` = may attend, ``.`` = masked.

    ``labels[i] = (req_id, pos)`` names row i (a query) and column i (a key). The two
    header lines give each column's request and position; rows read ``a 3 | x x x x . .``.
    """
    assert tuple(mask.shape) == (len(labels), len(labels)), "one label per row and column"
    w = max(len(str(p)) for _, p in labels)
    rid = max(len(r) for r, _ in labels)
    pad = " " * (rid + w + 2)
    lines = [pad + "| " + " ".join(r[:w].rjust(w) for r, _ in labels)]
    lines.append(pad + "| " + " ".join(str(p).rjust(w) for _, p in labels))
    for (r, p), row in zip(labels, mask.tolist()):
        cells = " ".join(("x" if allowed else ".").rjust(w) for allowed in row)
        lines.append(f"{r.rjust(rid)} {str(p).rjust(w)} | {cells}")
    return "\n".join(lines)


def fmt_diff(value: float, what: str = "batched - naive") -> str:
    return f"max |{what}| = {value:.1e}"
