"""demo_prefix_caching prints what really happened: the prefill tokens with caching off and on,
the shared blocks and the forks' copies, checked against the demo's own prompts and the pool."""

from __future__ import annotations

import re

import pytest

from demos import demo_prefix_caching as demo

ROW = re.compile(r"^caching (off|on)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)$", re.M)
SAVED = re.compile(r"^saved ([\d,]+) prefill tokens: hit rate (\d+)% .* the same greedy tokens: (\w+)$", re.M)
TABLE = re.compile(r"^(r\d\d) \[(.*)\]$", re.M)
SAMPLES = re.compile(r"^prefill tokens in all: (\d+) = (\d+) \+ (\d+) .* copy-on-write copies: (\d+)$", re.M)
FORK = re.compile(r"^  (s(?:\.\d)?)\s+(\d+) rows  \[(.*)\]$", re.M)


@pytest.mark.parametrize("system_len", ["48", "15"])
def test_the_demo_reports_the_tokens_it_saved(system_len: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--quick", "--system-len", system_len]) == 0
    out = capsys.readouterr().out
    rows = {m[1]: m for m in ROW.finditer(out)}
    prompts = demo.make_prompts(8, int(system_len), 0)
    assert int(rows["off"][2].replace(",", "")) == sum(p.shape[0] for p in prompts)  # every prompt token
    saved = SAVED.search(out)
    assert saved is not None and saved[3] == "True"
    tokens_saved = int(saved[1].replace(",", ""))
    assert int(rows["on"][2].replace(",", "")) == sum(p.shape[0] for p in prompts) - tokens_saved
    assert tokens_saved > 0 and tokens_saved % demo.BLOCK_SIZE == 0
    assert tokens_saved <= (len(prompts) - 1) * (int(system_len) // demo.BLOCK_SIZE) * demo.BLOCK_SIZE
    assert float(rows["on"][3]) <= float(rows["off"][3])  # TTFT p50 in steps
    tables = {m[1]: m[2].split() for m in TABLE.finditer(out)}
    starred = [cell for cells in tables.values() for cell in cells if cell.endswith("*")]
    assert len(tables) > 1 and starred, "the shared system prompt's blocks are drawn shared"
    held = [cell.rstrip("*") for cells in tables.values() for cell in cells]
    assert all(held.count(c.rstrip("*")) > 1 for c in starred)  # a star means two or more tables hold it
    if system_len == "48":  # the figures phase 13's page quotes
        assert (rows["off"][2], rows["on"][2], saved[1], saved[2]) == ("451", "179", "272", "60")


def test_the_forks_share_every_block_and_copy_the_partial_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--quick"]) == 0
    out = capsys.readouterr().out
    forks = {m[1]: (int(m[2]), m[3].split()) for m in FORK.finditer(out)}
    assert list(forks) == ["s", "s.1", "s.2", "s.3"]
    rows, table = forks["s"]
    for name in ("s.1", "s.2", "s.3"):
        assert forks[name][0] == rows - 1 and forks[name][1] == table[: len(forks[name][1])]
    samples = SAMPLES.search(out)
    assert samples is not None and int(samples[1]) == int(samples[2]) + int(samples[3]) == rows + 3
    assert (rows - 1) % demo.BLOCK_SIZE != 0 and int(samples[4]) == 3  # one copy per fork of the shared block
