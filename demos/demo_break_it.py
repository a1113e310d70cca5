"""Break it: switch off one piece that correctness rests on, and watch the oracle fail.

The oracle (``cb_lab/model/oracle.py``): every output row equals one dense causal forward of
its own request, to float32 rounding. ``--break CASE`` (repeatable) removes one piece:

- ``mask``: a ragged batch's mask without the same-request rule (positions only).
- ``prefix``: chunked prefill whose chunks do not see their cached rows ``[0, s)``.
- ``refeed``: decode seeded with the last prompt row instead of generated token 1.
- ``clamp``: ``probs.clamp(min=1e-3)`` after the softmax, so masked keys get probability.

The library has no broken mode: each case is built here from its public pieces. Look at
``max |out - oracle|`` (about 1e-7 when done right) and, for a broken case, the error of each
part (request, chunk, generated token): it shows which rows still match. Why those? Work it
out first (the exercises of phases 1, 2, 3 and 6 ask), then ``--explain`` prints the reason.
"""

from __future__ import annotations

import torch

from cb_lab.attention.dense_attention import causal_mask
from cb_lab.core.batch_builder import build_ragged_batch
from cb_lab.core.request import Request
from cb_lab.model.oracle import naive_tokens
from cb_lab.model.tiny_llm import TinyLLM
from demos._common import demo_parser, fmt_diff, make_model, make_request

CASES = {  # case -> (what it does done right, what it does broken, why the broken one fails)
    "mask": ("ragged prefill, a b c in one batch, d alone", "same, mask = position rule only",
             "rows attend to other requests' rows; d, alone in its batch, still matches"),
    "prefix": ("chunked prefill on top of the KV cache", "chunked prefill, chunks without their prefix",
               "a chunk misses the rows before it; the first chunk has none, so it still matches"),
    "refeed": ("decode seeded with generated token 1", "decode seeded with the last prompt row",
               "g1 comes from the prefill, so it is right; every token after the wrong input is wrong"),
    "clamp": ("attention of a b c in one batch", "same, probs.clamp(min=1e-3) after softmax",
              "masked keys (other requests, future rows) get probability 1e-3 each; every row leaks"),
}
Parts = dict[str, float]  # max |out - oracle| of each part of a case: a request, a chunk, a token


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, clamp: bool) -> torch.Tensor:
    """``dense_attention.scaled_dot_product_attention``'s few lines, plus the wrong one when ``clamp``."""
    scores = (q @ k.T * q.shape[-1] ** -0.5).masked_fill(~mask, float("-inf"))  # [N, Nk]
    probs = torch.softmax(scores, dim=-1)  # a masked key gets exactly 0 ...
    return (probs.clamp(min=1e-3) if clamp else probs) @ v  # ... or 1e-3: other requests' values leak in


def ragged_prefill(model: TinyLLM, prompts: dict[str, torch.Tensor], broken_mask: bool, clamp: bool | None) -> Parts:
    """One ragged prefill of whole prompts; ``clamp=None`` runs the library's ragged attention."""
    tokens, meta, mask = build_ragged_batch([(r, 0, p) for r, p in prompts.items()])
    if broken_mask:
        pos = torch.tensor([m.pos_in_seq for m in meta])  # [N]
        mask = pos[None, :] <= pos[:, None]  # [N, N]: causal, but no same-request check
    if clamp is None:
        out = model.forward_prefill_ragged(tokens, mask)[0]
    else:  # forward_prefill_ragged's steps, with the attention above
        q, k, v = model.project_qkv(tokens)
        out = model.o_proj(attention(q, k, v, mask, clamp))
    rows = {r: [m.global_idx for m in meta if m.req_id == r] for r in prompts}
    return {r: diff(out[rows[r]], model.forward_prefill_dense(p)[0]) for r, p in prompts.items()}


def chunked_prefill(model: TinyLLM, req: Request, chunk: int, broken: bool) -> Parts:
    dense_out, parts = model.forward_prefill_dense(req.prompt)[0], {}
    while req.in_prefill:
        s, rows = req.prefill_pos, req.get_prefill_chunk(chunk)
        e = s + rows.shape[0]
        past = req.kv_cache.get_kv() if s > 0 and not broken else None  # cached K/V of [0, s)
        out, k, v = model.forward_prefill_ragged(rows, causal_mask(e - s, e - s if past is None else e), past)
        req.append_kv(k, v)
        req.prefill_pos = e
        parts[f"{s}:{e}"] = diff(out, dense_out[s:e])
    return parts


def decode(model: TinyLLM, req: Request, broken: bool) -> Parts:
    out, k, v = model.forward_prefill_dense(req.prompt)  # prefill; its last row is generated token 1
    req.append_kv(k, v)
    req.prefill_pos = req.prompt_len
    req.append_token(out[-1])
    feed = req.prompt[-1] if broken else req.last_token
    while not req.finished:
        out, k, v = model.forward_decode(feed, req.kv_cache)
        req.append_kv(k, v)
        req.append_token(out[0])
        feed = req.last_token
    want = naive_tokens(model, req)  # [n, D]: the oracle of the tokens the request holds
    return {f"g{i + 1}": diff(got, want[i]) for i, got in enumerate(req.generated_tokens)}


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@torch.no_grad()
def run_cases(broken: set[str], quick: bool, seed: int) -> dict[str, Parts]:
    """Every case, broken where ``broken`` names it: the error of each of its parts."""
    dim, lens, length, chunk, n = (8, (3, 4, 2, 3), 8, 3, 4) if quick else (16, (5, 6, 4, 5), 14, 4, 6)
    model = make_model(dim, seed)
    p = {r: torch.randn(m, dim) for r, m in zip("abcd", lens)}
    abc = {r: p[r] for r in "abc"}
    chunk_req, decode_req = make_request("p", length, 1, dim), make_request("r", length, n, dim)
    return {
        "mask": ragged_prefill(model, abc, "mask" in broken, None)
        | ragged_prefill(model, {"d": p["d"]}, "mask" in broken, None),  # d alone: nobody else to see
        "prefix": chunked_prefill(model, chunk_req, chunk, "prefix" in broken),
        "refeed": decode(model, decode_req, "refeed" in broken),
        "clamp": ragged_prefill(model, abc, False, "clamp" in broken),
    }


def errors(broken: set[str], quick: bool, seed: int) -> dict[str, float]:
    """``max |out - oracle|`` of each case."""
    return {case: max(parts.values()) for case, parts in run_cases(broken, quick, seed).items()}


def main(argv: list[str] | None = None) -> int:
    parser = demo_parser(__doc__)
    parser.add_argument("--break", dest="broken", choices=list(CASES), action="append", help="piece to switch off")
    parser.add_argument("--explain", action="store_true",
                        help="say why a broken case fails where it does (guess first: the exercises ask)")
    args = parser.parse_args(argv)
    broken = set(args.broken or ())
    for case, parts in run_cases(broken, args.quick, args.seed).items():
        err, (right, wrong, why) = max(parts.values()), CASES[case]
        what = wrong if case in broken else right
        print(f"{case:<6}  {what:<45}  {fmt_diff(err, 'out - oracle')}  {'OK' if err < 1e-5 else 'FAILS'}")
        if case in broken:
            print("        per part: " + "  ".join(f"{q} {e:.1e}" for q, e in parts.items()))
            print(f"        why: {why}" if args.explain else
                  "        why: which parts still match, and why? guess first, then rerun with --explain")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
