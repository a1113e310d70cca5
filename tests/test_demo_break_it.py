"""The break-it demo: done right every case matches the oracle; each break fails its own case
only, in the way the demo says (checked from the numbers, not from the printed text)."""

from __future__ import annotations

import re

import pytest
import torch

from cb_lab.attention.dense_attention import scaled_dot_product_attention
from cb_lab.core.batch_builder import build_ragged_batch
from demos import demo_break_it
from demos.demo_break_it import CASES, errors, run_cases

TOL = 1e-5  # float32 rounding; the demo's OK / FAILS line
# Smallest error a broken case must show. Measured over seeds 0..9, quick and full: mask and
# prefix >= 1.0, refeed >= 0.25 (rows see wrong keys, or get a wrong input); clamp 4e-3..1.4e-2
# (1e-3 of probability on each of a handful of masked keys).
BROKEN = {"mask": 0.1, "prefix": 0.1, "refeed": 0.1, "clamp": 1e-3}
LINE = re.compile(r"^(\w+)\s+.*max \|out - oracle\| = (\S+)\s+(OK|FAILS)$")


@pytest.mark.parametrize("quick", [True, False])
def test_done_right_every_case_matches_the_oracle(quick: bool) -> None:
    errs = errors(set(), quick, 0)
    assert list(errs) == list(CASES) and max(errs.values()) < TOL, errs


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", list(CASES))
def test_a_break_fails_its_own_case_only(case: str, seed: int) -> None:
    right = errors(set(), True, seed)
    errs = errors({case}, True, seed)
    assert errs[case] > BROKEN[case], errs
    assert all(errs[c] == right[c] for c in CASES if c != case), "breaking one case moved another"


def test_breaks_combine() -> None:
    errs = errors(set(CASES), False, 0)
    assert all(errs[c] > BROKEN[c] for c in CASES), errs


@pytest.mark.parametrize("quick", [True, False])
def test_prefix_first_chunk_still_matches(quick: bool) -> None:
    parts = run_cases({"prefix"}, quick, 0)["prefix"]
    (first, first_err), *rest = parts.items()
    assert first.startswith("0:") and first_err < TOL, "the first chunk has no prefix to forget"
    assert rest and all(e > BROKEN["prefix"] for _, e in rest), parts
    assert max(run_cases(set(), quick, 0)["prefix"].values()) < TOL


@pytest.mark.parametrize("quick", [True, False])
def test_refeed_first_token_right_the_rest_wrong(quick: bool) -> None:
    parts = run_cases({"refeed"}, quick, 0)["refeed"]
    assert list(parts) == [f"g{i + 1}" for i in range(len(parts))] and len(parts) >= 3
    assert parts["g1"] < TOL, "g1 comes from the prefill, before any decode"
    assert all(parts[g] > 1e-2 for g in list(parts)[1:]), parts


@pytest.mark.parametrize("quick", [True, False])
def test_mask_only_requests_sharing_a_batch_go_wrong(quick: bool) -> None:
    parts = run_cases({"mask"}, quick, 0)["mask"]
    assert set(parts) == {"a", "b", "c", "d"}
    assert parts["d"] < TOL, "d runs alone in its batch"
    assert all(parts[r] > BROKEN["mask"] for r in "abc"), parts


def test_clamp_gives_masked_keys_probability() -> None:
    g = torch.Generator().manual_seed(0)
    _, _, mask = build_ragged_batch([("a", 0, torch.zeros(3, 4)), ("b", 2, torch.zeros(2, 4))])  # [5, 5]
    q, k = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    eye = torch.eye(5)  # values = identity, so attention's output IS its probabilities [N, Nk]
    right = demo_break_it.attention(q, k, eye, mask, clamp=False)
    torch.testing.assert_close(right, scaled_dot_product_attention(q, k, eye, mask)[1])  # the library's probs
    assert bool((right[~mask] == 0).all())
    clamped = demo_break_it.attention(q, k, eye, mask, clamp=True)
    assert bool((clamped[~mask] == 1e-3).all()), "every masked key gets 1e-3"
    assert bool((clamped.sum(-1) > 1).all()), "and each row's probabilities no longer sum to 1"
    parts = run_cases({"clamp"}, True, 0)["clamp"]
    assert set(parts) == {"a", "b", "c"} and all(e > BROKEN["clamp"] for e in parts.values()), parts


@pytest.mark.parametrize("explain", [False, True])
@pytest.mark.parametrize("broken", [[], ["mask"], ["prefix"], ["refeed"], ["clamp"], list(CASES)])
def test_main_prints_each_case_with_its_verdict(broken: list[str], explain: bool,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    argv = [w for c in broken for w in ("--break", c)] + ["--quick"] + (["--explain"] if explain else [])
    assert demo_break_it.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [m for m in map(LINE.match, out) if m]
    errs = errors(set(broken), True, 0)
    assert [m[1] for m in lines] == list(CASES)
    for m in lines:
        assert m[3] == ("FAILS" if m[1] in broken else "OK")
        assert float(m[2]) == pytest.approx(errs[m[1]], rel=0.06, abs=1e-12)  # printed with 2 digits
    whys = [line.strip() for line in out if line.strip().startswith("why:")]
    assert len(whys) == len(broken)
    reasons = [f"why: {CASES[c][2]}" for c in CASES if c in broken]
    if explain:  # the reason, only when asked for
        assert whys == reasons
    else:
        assert all(w == "why: which parts still match, and why? guess first, then rerun with --explain" for w in whys)
        assert not any(CASES[c][2] in "\n".join(out) for c in CASES)
