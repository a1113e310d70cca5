"""Phase 2: a ragged batch, many requests' chunks in one flat tensor and no padding.

``build_ragged_batch`` lays the chunks end to end and returns a token table (which
request and position each row is) and one boolean mask. The mask's only rule: a row
may attend a row of the *same request* at a position *not after its own*. Request b's
chunk starts at position 4: its rows 0..3 are already in its KV cache, so the forward
adds them as extra key columns on the left (the grid shows only the batch's own columns).

Look at: the block-diagonal, lower-triangular grid, and the max difference between the
ragged forward and one dense forward per request: float rounding only.
"""

from __future__ import annotations

import torch

from cb_lab.core.batch_builder import build_ragged_batch, cached_prefix_mask
from demos._common import demo_parser, fmt_diff, make_model, mask_grid

# (req_id, start_pos, length): the chunk is the last `length` rows of a prompt of start_pos + length rows.
QUICK_CHUNKS = [("a", 0, 3), ("b", 4, 3), ("c", 0, 2)]
FULL_CHUNKS = [("a", 0, 5), ("b", 6, 4), ("c", 0, 3)]


def main(argv: list[str] | None = None) -> int:
    args = demo_parser(__doc__).parse_args(argv)
    dim, specs = (8, QUICK_CHUNKS) if args.quick else (16, FULL_CHUNKS)
    model = make_model(dim, args.seed)
    prompts = {r: torch.randn(s + n, dim) for r, s, n in specs}
    tokens, meta, mask = build_ragged_batch([(r, s, prompts[r][s:]) for r, s, _ in specs])

    print("token table (one column per row of the flat batch):")
    print("  global_idx " + " ".join(f"{m.global_idx:>2}" for m in meta))
    print("  req_id     " + " ".join(f"{m.req_id:>2}" for m in meta))
    print("  pos_in_seq " + " ".join(f"{m.pos_in_seq:>2}" for m in meta))
    print("\nragged causal mask (x = may attend, . = masked; row = query, column = key):")
    print(mask_grid(mask, [(m.req_id, m.pos_in_seq) for m in meta]))

    # Cached prefixes: b's positions 0..start-1 come from its KV cache (here: a dense prefill of them).
    past = [model.forward_prefill_dense(prompts[r][:s]) for r, s, _ in specs if s > 0]
    full_mask = cached_prefix_mask(torch.tensor([s for _, s, _ in specs]), torch.tensor([n for _, _, n in specs]))
    assert torch.equal(full_mask[:, -len(meta):], mask), "the batch's own columns are build_ragged_batch's mask"
    past_kv = (torch.cat([k for _, k, _ in past]), torch.cat([v for _, _, v in past])) if past else None
    out, _, _ = model.forward_prefill_ragged(tokens, full_mask, past_kv)

    print("\nragged forward vs one dense forward per request:")
    worst = 0.0
    for r, s, n in specs:
        rows = [m.global_idx for m in meta if m.req_id == r]
        dense_out, _, _ = model.forward_prefill_dense(prompts[r])  # the whole sequence 0..s+n-1
        diff = (out[rows] - dense_out[s:]).abs().max().item()
        worst = max(worst, diff)
        print(f"  {r}: positions {s}:{s + n}  {fmt_diff(diff, 'ragged - dense')}")
    print(f"all requests: {fmt_diff(worst, 'ragged - dense')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
