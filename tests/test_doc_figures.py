"""The figures the learning path quotes come from runs this test repeats, so the pages cannot drift.

Each phase page (``docs/learning_materials/phaseN_*.md``, and its ``_zh`` twin, which quotes the
same output) explains a command's output line by line, quoting it in code spans. ``FIGURES``
lists, page by page, each command and what the page quotes from it:

- ``quotes``: code spans the page shows; each must be a span of both pages and match a line of
  the command's output, after runs of spaces are read as one. ``...`` stands for any text (a
  wall-clock figure, an elided part); every other character, every digit, must be there.
- ``bounds``: ``(pattern, limit)``: every number the pattern's group finds in the output is below
  ``limit``. Float32 rounding depends on the machine, so a page writes such a figure as ``...``
  in its quote and the bound in words: "below 1e-5" (``低于 1e-5``).

And the other way: every code span with a digit in a page's "Run it" section is a quote, a part
of one, a command or a flag, or listed in ``NOT_OUTPUT`` (a chunk, a position the prose names). A
figure added to a page without a run that checks it fails here.

Commands run in this process the way ``python -m MODULE ARGS`` would (its ``main(ARGS)``, no
``--quick`` added), in a temporary folder, on one torch thread (a quoted figure is a count, a
step or a bound, none of which depends on the thread count). ``pytest PATH [-k NAME]`` is collected, not run: it
prints ``N passed, M deselected`` when its tests pass, and that is the line its quotes match.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch

from cb_lab.model.registry import DEFAULT_MODEL, model_file
from tests.test_doc_commands import entry_point

ROOT = Path(__file__).resolve().parent.parent
PAGES = ROOT / "docs" / "learning_materials"
FENCE = re.compile(r"^```\w*\n.*?^```", re.DOTALL | re.MULTILINE)
SPAN = re.compile(r"(?<!`)`([^`]+)`(?!`)")
NUMBER = r"([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"
FLOAT = "below 1e-5"  # float32 rounding of a result against its oracle: about 1e-7, never near 1e-5


@dataclass(frozen=True)
class Run:
    command: str
    quotes: tuple[str, ...] = ()
    bounds: tuple[tuple[str, float], ...] = ()  # (regex whose group 1 is a number, limit)
    real_model: bool = False  # runs SmolLM2 (make model): skipped where it is not installed


def oracle(label: str) -> tuple[str, float]:
    """Every ``LABEL = x`` of the output is float32 rounding: below 1e-5."""
    return re.escape(label) + r"\s*=\s*" + NUMBER, 1e-5


FIGURES: dict[str, list[Run]] = {
    "phase0_setup": [Run(
        "python -m cb_lab --quick",
        quotes=(
            "cb-lab: 6 requests, dim 16, dense caches, budget 8 tokens/step, prefill chunks <= 4, fused executor",
            "0  PPPPPPPP      0       8      3        0",
            "3  DDDPPPP.      3       4      1        3",
            "steps: 12, tokens: 57 (44 prefill + 13 decode), budget used: 59%, throughput: ... tokens/s, "
            "model calls: 12",
            "requests: 6 finished, mean latency ... ms, p99 ... ms",
            "oracle: max |batched - naive recompute| = ... over 6 requests (OK)",
        ),
        bounds=(oracle("oracle: max |batched - naive recompute|"),),
    )],
    "phase1_prefill": [
        Run("python -m demos.demo_prefill_only", quotes=(
            "prompt: 14 rows of dim 16, prefilled in chunks of 4",
            "chunk  0:4  -> cache len  4 (rows prefilled 4)",
            "chunked vs dense prefill outputs: max |chunked - dense| = ...",
            "cached K vs dense K: max |chunked - dense| = ...",
        ), bounds=(oracle("max |chunked - dense|"),)),
        Run("python -m demos.demo_prefill_only --chunk 5", bounds=(oracle("max |chunked - dense|"),)),
        Run("python -m demos.demo_prefill_only --quick", bounds=(oracle("max |chunked - dense|"),)),
    ],
    "phase2_ragged": [
        Run("python -m demos.demo_ragged_mask", quotes=(
            "  req_id      a  a  a  a  a  b  b  b  b  c  c  c",
            "  pos_in_seq  0  1  2  3  4  6  7  8  9  0  1  2",
            "b 7 | . . . . . x x . . . . .",
            "  b: positions 6:10  max |ragged - dense| = ...",
            "all requests: max |ragged - dense| = ...",
        ), bounds=(oracle("max |ragged - dense|"),)),
        Run("python -m demos.demo_break_it --break mask", quotes=(
            "mask    same, mask = position rule only                max |out - oracle| = 2.2e+00  FAILS",
            "        per part: a 1.4e+00  b 1.1e+00  c 2.2e+00  d ...",
        ), bounds=(("per part: a .* d " + NUMBER, 1e-5),)),
    ],
    "phase3_mix": [
        Run("python -m demos.demo_prefill_decode_mix", quotes=(
            "6 requests (prompt_len/max_new: a 5/3, b 12/4, c 7/2, d 3/6, e 10/3, f 4/5), budget 8, chunk 4",
            "step 0 | decode=[] prefill=[a 0:4, b 0:4] | tokens 8/8",
            "step 1 | decode=[] prefill=[a 4:5, b 4:8, c 0:3] | tokens 8/8",
            "step 2 | decode=[a] prefill=[b 8:12, c 3:6] | tokens 8/8",
            "step 3 | decode=[a b] prefill=[c 6:7, d 0:3, e 0:2] | tokens 8/8 | finished: a",
            "step 6 | decode=[d e] prefill=[f 3:4] | tokens 3/8",
            "  d: 6 tokens, max |batched - naive| = ...",
        ), bounds=(oracle("max |batched - naive|"),)),
        Run("python -m demos.demo_break_it --break refeed", quotes=(
            "refeed  decode seeded with the last prompt row         max |out - oracle| = 1.6e+00  FAILS",
            "        per part: g1 ...  g2 1.6e+00  g3 2.6e-01  g4 2.2e-01  g5 1.9e-01  g6 1.7e-01",
        ), bounds=(("per part: g1 " + NUMBER, 1e-5),)),
    ],
    "phase4_timeline": [Run("python -m demos.demo_scheduler_timeline", quotes=(
        "14 requests, budget 8 tokens/step, prefill chunk 4",
        "req arrives prompt/new | 01234567890123456789012",
        "  a       0      4/3   | PDD",
        "  e       3     11/2   |    .PPPPD",
        "step   2 | DPPPPPPP | 8/8",
        "step  19 | DD...... | 2/8",
        "steps: 23, mean budget utilisation: 78%, mean steps to first token: 3.36 (counting the arrival step)",
    ))],
    "phase5_kv": [
        Run("python -m demos.demo_paged_attention", quotes=(
            "block_size 4; prompt_len/max_new: a 13/6, b 30/8, c 4/3, d 21/12",
            "step  0 | num_blocks 25, used_blocks  2, free_blocks 23, tokens_stored  8, unused_slots  0",
            "step  8 | num_blocks 25, used_blocks 12, free_blocks 13, tokens_stored 45, unused_slots  3 | finished: a "
            "(its blocks are free again)",
            "a after prefill  | len 13 | unused slots 3 | block_table [0, 2, 4, 6] | 0:[0 1 2 3] 2:[4 5 6 7] ...",
            "a at last decode | len 17 | ... block_table [0, 2, 4, 6, 15]",
            "[10, 14, 8, 16, 15, 6, 0, 2]",
            "paged_attention vs dense attention over get_kv(): max |paged - dense| = ...",
        ), bounds=(oracle("max |paged - dense|"), oracle("max |batched - naive|"))),
        Run("python -m demos.demo_paged_attention --block-size 8", quotes=(
            "step  4 | num_blocks 13, used_blocks  7, free_blocks  6, tokens_stored 40, unused_slots 16",
        )),
        Run("python -m cb_lab --quick --cache paged --block-size 3", quotes=(
            "steps: 12, tokens: 57 (44 prefill + 13 decode), budget used: 59%, ...",
            "oracle: max |batched - naive recompute| = ... over 6 requests (OK)",
        ), bounds=(oracle("oracle: max |batched - naive recompute|"),)),
    ],
    "phase6_attention": [
        Run("python -m demos.demo_break_it --break clamp", quotes=(
            "clamp   same, probs.clamp(min=1e-3) after softmax      max |out - oracle| = 1.3e-02  FAILS",
            "per part: a 1.2e-02  b 1.1e-02  c 1.3e-02",
        )),
        Run("python -m demos.demo_break_it --break clamp --explain", quotes=(
            "why: masked keys (other requests, future rows) get probability 1e-3 each; every row leaks",
        )),
        Run("python -m demos.demo_break_it", quotes=(
            "clamp   attention of a b c in one batch                max |out - oracle| = ...  OK",
        ), bounds=(oracle("max |out - oracle|"),)),
    ],
    "phase7_tests": [
        Run("pytest tests/test_scheduler.py", quotes=("51 passed in ...s",)),
        Run("pytest tests/test_scheduler.py -k fault", quotes=("24 passed, ... deselected",)),
        Run("pytest tests/test_bad_inputs.py -k scheduler", quotes=("17 passed, ... deselected",)),
        Run("pytest tests/test_serving_engine.py -k any_serving_run", quotes=("1 passed, ... deselected",)),
    ],
    "phase8_exploration": [
        Run("python -m cb_lab --quick", quotes=(
            "cb-lab: 6 requests, dim 16, dense caches, budget 8 tokens/step, prefill chunks <= 4, fused executor",
            "0  PPPPPPPP      0       8      3        0",
            "11  D.......      1       0      0        1",
            "steps: 12, tokens: 57 (44 prefill + 13 decode), budget used: 59%, ...",
            "oracle: max |batched - naive recompute| = ... over 6 requests (OK)",
        ), bounds=(oracle("oracle: max |batched - naive recompute|"),)),
        Run("python -m cb_lab --quick --budget 4", quotes=(
            "steps: 17, tokens: 57 (44 prefill + 13 decode), budget used: 84%, ...",
        )),
    ],
    "phase9_fused_step": [
        Run("python -m demos.demo_fused_step", quotes=(
            "8 requests, dim 16, budget 8, chunk 4, 29 blocks per pool",
            "step  4 | 4 decode + 4 prefill | model calls: split 5, fused 1",
            "step 10 | 4 decode + 0 prefill | model calls: split 4, fused 1",
            "all 55 generated tokens: max |split - fused| = ...",
            "model calls in total: split 57, fused 19",
            "compute wall time (...): split ... ms, fused ... ms; fused runs ...x as fast",
            "block  1: d . . .   <- was b's",
        ), bounds=(oracle("max |split - fused|"), oracle("max |batched - naive|"))),
        Run("python -m demos.demo_fused_step --dim 1024",
            bounds=(oracle("max |split - fused|"), oracle("max |batched - naive|"))),
        Run("python -m cb_lab.bench fused --quick", quotes=(
            "16       4    22  1.08x    split     2      4       0    4.0",
            "16       4    22  1.08x    fused     2      4       0    1.0",
            "16       8    24  1.17x    split     2      8       0    8.0",
        )),
    ],
    "phase10_block_pool": [
        Run("python -m demos.demo_paged_attention --quick", quotes=(
            "block_size 4; prompt_len/max_new: a 5/3, b 9/4, c 2/3",
            "step  2 | num_blocks  6, used_blocks  6, free_blocks  0, tokens_stored 18, unused_slots  6",
            "step  3 | ... used_blocks  3, free_blocks  3, tokens_stored 10, unused_slots  2 | finished: a c "
            "(its blocks are free again)",
            "step  5 | num_blocks  6, used_blocks  0, free_blocks  6, tokens_stored  0, unused_slots  0",
            "a after prefill  | len  5 | unused slots 3 | block_table [0, 2]",
            "b after prefill  | len  9 | unused slots 3 | block_table [1, 3, 5]",
            "paged_attention vs dense attention over get_kv(): max |paged - dense| = ...",
        ), bounds=(oracle("max |paged - dense|"), oracle("max |batched - naive|"))),
        Run("python -m cb_lab.bench memory --quick", quotes=(
            "shared pool  3,552  3,246  8.6%  7.0%  0.47  0.94",
            "dense prealloc  4,453  3,246  27.1%  24.4%  1.94  3.41",
        )),
    ],
    "phase11_serving": [
        Run("python -m demos.demo_admission_preemption --quick", quotes=(
            "budget 8, chunk 4, max_num_seqs 3, one pool of 6 blocks x 4 rows",
            "step  0 | decode [] | prefill [a 0:4, b 0:4] | admitted [a b] | waits: c (budget) | pool after: 2 used, "
            "4 free",
            "step  1 | ... | admitted [c] | waits: d (max_num_seqs)",
            "step  5 | decode [a b] | prefill [] | PREEMPTED [d] | waits: e (no_blocks) | pool after: 3 used, 3 free",
            "step  6 | decode [a] | prefill [d 0:4, e 0:3] | admitted [d e]",
            "preemptions: 1; the pool at the end: {... 'used_blocks': 0, 'free_blocks': 6, ...}",
            "d               3     4  1.50    7          1",
            "oracle: max |batched - naive| = ... over every request (preempted and recomputed: d)",
        ), bounds=(oracle("max |batched - naive|"),)),
        Run("python -m demos.demo_admission_preemption --quick --num-blocks 16", quotes=(
            "d               3     4  1.00    6          0",
        )),
    ],
    "phase12_static_vs_continuous": [
        Run("python -m demos.demo_static_vs_continuous --quick", quotes=(
            "128 requests at step 0, outputs lognormal (median 4, at most 64): mean 13.9, longest 64",
            "static         485       12.50              422     5896     ...",
            "continuous     158       38.37               95        0     ...",
            "continuous / static: 3.07x tokens/step, 0.22x p99 TTFT (counted in steps: the same on every machine)",
            "* tokens/s: ...x on this machine's clock, which moves with its load",
            "batch 0: 16 requests, outputs mean  15.0, longest  64: slots busy 23%",
            "all 8 batches: mean output 13.9, mean longest 59.9 -> continuous can reach 59.9 / 13.9 = 4.31x "
            "(measured 3.07x: ...)",
            "r016 |.................................................................PPDDDD |",
            "r016 |.PPDDDD",
        )),
        Run("python -m demos.demo_static_vs_continuous --quick --slots 4", quotes=(
            "all 32 batches: mean output 13.9, mean longest 35.1 -> continuous can reach 35.1 / 13.9 = 2.53x",
        )),
        Run("python -m cb_lab compare --quick", quotes=(
            "static  485  12.50  ...  196  422",
            "sjf  162  37.43  ...  14  72",
            "steps, tok/step and the latencies (in steps) are the same on every machine; tok/s and wall s are this "
            "machine's clock",
        )),
    ],
    "phase14_real_model": [
        Run("python -m demos.demo_real_model --quick", real_model=True, quotes=(
            "smollm2-135m-instruct: loaded in ... s; 6 questions, budget 128 tokens/step, prefix caching on",
            "[q0] What is the capital of France?  (arrived at step 0; 45 prompt tokens)",
            "8 tokens (stop)",
            "prefix cache: 96 of 265 prompt tokens not computed again (the shared system prompt)",
        )),
        Run("python -m demos.demo_real_model --quick --no-prefix-caching", real_model=True, quotes=("0 of 265",)),
    ],
    "phase13_prefix_caching": [
        Run("python -m demos.demo_prefix_caching --quick", quotes=(
            "8 requests: a 48-token system prompt + 4..12 tokens each, two arriving per step; blocks of 8 tokens",
            "caching off   451 ...",
            "caching on   179 ...",
            "saved 272 prefill tokens: hit rate 60% of the prompt tokens, 64% of their full blocks; the same greedy "
            "tokens: True",
            "step 3 block tables: * shared by two or more requests",
            "r00 [ 0*  1*  2*  3*  8*  9* 10  11 ]",
            "r01 [ 4   5 6   7 ...]",
            "r02 [ 0*  1*  2*  3* 15  16 ...]",
            "the pool at the end: 0 blocks in use, 11 cached and evictable, 245 free",
            "SamplingParams(n=4) of one 56-token prompt ...",
            "prefill tokens in all: 59 = 56 + 3 ...; copy-on-write copies: 3",
        )),
        Run("python -m demos.demo_prefix_caching --quick --system-len 15", quotes=(
            "saved 48 prefill tokens: hit rate 25% of the prompt tokens, ...",
        )),
        Run("python -m demos.demo_prefix_caching --quick --num-blocks 12", quotes=(
            "caching off   675 ...",
            "caching on   162 ...   4",
        )),
    ],
}

NOT_OUTPUT: dict[str, set[str]] = {
    "phase1_prefill": {"a 5", "0.0e+00"},  # a row of the grid; what the rounding may read
    "phase2_ragged": {"b 6"},
    "phase3_mix": {"g1..g6"},
    "phase4_timeline": {"e 0:2", "2:6", "6:10", "10:11"},  # e's chunks, read off its row
    "phase7_tests": {"{1}", "{2}", "{3, 4}", "{2, 5, 7}", "scheduler/init-max_tokens_per_step=0"},  # test ids
    "phase14_real_model": {f"q{i}" for i in range(6)},  # the demo's request ids, named in the prose
}


def normal(text: str) -> str:
    return " ".join(text.split())


def page_spans(path: Path, section: bool = False) -> list[str]:
    """The page's code spans outside code blocks (only its "Run it" section when ``section``), each on one line."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    if section:
        parts = re.split(r"^(## .*)$", text, flags=re.M)  # [before, heading, body, heading, body, ...]
        text = next(body for head, body in zip(parts[1::2], parts[2::2]) if head.strip() in ("## Run it", "## 运行"))
    return [normal(s) for s in SPAN.findall(text)]


def matches(quote: str, line: str) -> bool:
    """``quote`` (``...`` = any text) somewhere in ``line``, runs of spaces read as one."""
    parts = [part.strip() for part in re.split(r"(?<!\.)\.\.\.(?!\.)", normal(quote))]
    return re.search(".*?".join(map(re.escape, parts)), normal(line)) is not None


@cache
def output_of(command: str) -> str:
    """What ``command`` prints (a pytest command: the summary line its run would end with)."""
    words = shlex.split(command)
    if words[0] == "pytest":
        return pytest_summaries()[command]
    threads = torch.get_num_threads()
    cwd = os.getcwd()
    out = io.StringIO()
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(out):
            os.chdir(tmp)  # --plot out/ and the like write here
            torch.set_num_threads(1)  # quick on a busy machine; no quoted figure depends on the thread count
            code = entry_point(words[2])(words[3:])
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    assert code == 0, f"{command} returned {code}:\n{out.getvalue()[-2000:]}"
    return out.getvalue()


COLLECT = """
import shlex, sys, pytest
for command in sys.argv[1:]:
    print("== " + command, flush=True)
    pytest.main(["--collect-only", "-q", "-o", "addopts=", "-p", "no:cacheprovider", *shlex.split(command)[1:]])
"""


@cache
def pytest_summaries() -> dict[str, str]:
    """Every pytest command of ``FIGURES``, collected in one child process: ``N passed[, M deselected] in 0.00s``."""
    commands = [r.command for runs in FIGURES.values() for r in runs if r.command.startswith("pytest")]
    result = subprocess.run([sys.executable, "-c", COLLECT, *commands], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    summaries = {}
    for part in result.stdout.split("== ")[1:]:
        command, *lines = part.strip().splitlines()
        # the last line: "24/43 tests collected (19 deselected) in 1.2s", or "43 tests collected in 1.2s"
        m = re.match(r"(\d+)(?:/\d+)? tests? collected(?: \((\d+) deselected\))?", lines[-1])
        assert m is not None, part
        summaries[command] = f"{m[1]} passed" + (f", {m[2]} deselected" if m[2] else "") + " in 0.00s"
    assert set(summaries) == set(commands), result.stdout[-2000:]
    return summaries


CASES = [(page, run) for page, runs in FIGURES.items() for run in runs]


def twins(page: str) -> list[Path]:
    return [PAGES / f"{page}.md", PAGES / f"{page}_zh.md"]


@pytest.mark.parametrize(("page", "run"), CASES, ids=[f"{p}: {r.command}" for p, r in CASES])
def test_the_page_quotes_what_the_run_prints(page: str, run: Run) -> None:
    if run.real_model and model_file(DEFAULT_MODEL) is None:
        pytest.skip(f"{DEFAULT_MODEL} is not installed: make model")
    for path in twins(page):
        spans = page_spans(path)
        missing = [q for q in run.quotes if normal(q) not in spans]
        assert not missing, f"{path.name} does not show {missing} (quoted from `{run.command}`)"
    lines = output_of(run.command).splitlines()
    for quote in run.quotes:
        assert any(matches(quote, line) for line in lines), f"`{run.command}` prints no line like `{quote}`"
    text = output_of(run.command)
    for pattern, limit in run.bounds:
        found = [float(x) for x in re.findall(pattern, text)]
        assert found, f"`{run.command}` prints nothing like {pattern!r}"
        assert max(found) < limit, f"`{run.command}`: {pattern!r} reads {max(found)}, not below {limit:g}"


@pytest.mark.parametrize("page", sorted(FIGURES))
def test_a_bound_is_written_as_a_bound(page: str) -> None:
    """A page that quotes a float32-rounding figure as ``...`` says what it is below, in both languages."""
    bounded = [r for r in FIGURES[page] if r.bounds]
    for path in twins(page):
        text = path.read_text(encoding="utf-8")
        words = FLOAT if not path.stem.endswith("_zh") else "低于 1e-5"
        for run in bounded:
            assert words in normal(text), f"{path.name} quotes `{run.command}`'s rounding without '{words}'"


def figure_spans(path: Path) -> list[str]:
    """The code spans of the "Run it" section that hold a digit and are not commands or flags."""
    return [s for s in page_spans(path, section=True)
            if re.search(r"\d", s) and not s.startswith(("python -m", "pytest", "--"))]


@pytest.mark.parametrize("path", sorted(PAGES.glob("phase*.md")), ids=lambda p: p.name)
def test_every_figure_in_run_it_comes_from_a_run(path: Path) -> None:
    page = path.stem.removesuffix("_zh")
    quoted = [normal(q) for run in FIGURES.get(page, []) for q in run.quotes]
    allowed = {normal(s) for s in NOT_OUTPUT.get(page, set())}
    loose = [s for s in figure_spans(path) if s not in allowed and not any(s in q for q in quoted)]
    assert not loose, f"{path.name} quotes {loose} in 'Run it' with no run in FIGURES that checks them"


def test_phase7_counts_the_hypothesis_workloads_it_says() -> None:
    """Phase 7 says each of its two property tests draws 60 workloads."""
    for path in ("tests/test_scheduler.py", "tests/test_serving_engine.py"):
        assert "max_examples=60)" in (ROOT / path).read_text(encoding="utf-8"), path
    assert all("60 hypothesis workloads" in normal(p.read_text(encoding="utf-8")) or "60 个" in p.read_text(
        encoding="utf-8") for p in twins("phase7_tests"))
