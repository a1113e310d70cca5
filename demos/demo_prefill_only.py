"""Phase 1: prefill, one request, in chunks.

Prefill runs the prompt through the model and fills the KV cache; nothing is generated
until the last prompt row. Here the prompt goes in chunks: a chunk covering positions
``[s, e)`` attends to the cached K/V of ``[0, s)`` plus its own rows causally, so its
mask is the rows ``s..e-1`` of the dense causal mask (lower-right aligned, see
``attention/dense_attention.py``).

Look at: the cache length after each chunk (always the rows prefilled so far), and the
max difference between chunked and one-shot (dense) prefill: float rounding, nothing more.
"""

from __future__ import annotations

import torch

from cb_lab.attention.dense_attention import causal_mask
from cb_lab.core.kv_cache import DenseKVCache
from demos._common import demo_parser, fmt_diff, make_model, make_request, mask_grid


def main(argv: list[str] | None = None) -> int:
    parser = demo_parser(__doc__)
    parser.add_argument("--chunk", type=int, default=None, help="prefill chunk size")
    args = parser.parse_args(argv)
    dim, prompt_len = (8, 8) if args.quick else (16, 14)
    chunk = args.chunk or (3 if args.quick else 4)
    model = make_model(dim, args.seed)
    req = make_request("a", prompt_len, 1, dim, DenseKVCache())
    print(f"prompt: {prompt_len} rows of dim {dim}, prefilled in chunks of {chunk}\n")

    outs = []
    while req.in_prefill:
        s = req.prefill_pos
        rows = req.get_prefill_chunk(chunk)  # a pure read: nothing moves until we commit
        e = s + rows.shape[0]
        past = req.kv_cache.get_kv() if s > 0 else None  # cached K/V of positions [0, s)
        # Queries are positions s..e-1, keys 0..e-1: the lower-right corner of the causal mask.
        out, k, v = model.forward_prefill_ragged(rows, causal_mask(e - s, e), past)
        req.append_kv(k, v)  # commit: store K/V, then advance prefill_pos
        req.prefill_pos = e
        outs.append(out)
        print(f"chunk {s:2d}:{e:<2d} -> cache len {len(req.kv_cache):2d} (rows prefilled {e})")

    dense_out, dense_k, _ = model.forward_prefill_dense(req.prompt)  # the whole prompt at once
    cached_k, _ = req.kv_cache.get_kv()
    out_diff = (torch.cat(outs) - dense_out).abs().max().item()
    print(f"\nchunked vs dense prefill outputs: {fmt_diff(out_diff, 'chunked - dense')}")
    print(f"cached K vs dense K:              {fmt_diff((cached_k - dense_k).abs().max().item(), 'chunked - dense')}")
    print("\ndense causal mask (x = may attend, . = masked; row = query position, column = key):")
    print(mask_grid(causal_mask(prompt_len, prompt_len), [("a", p) for p in range(prompt_len)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
