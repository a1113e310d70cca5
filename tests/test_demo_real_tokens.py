"""demos/demo_real_tokens.py: it trains once, caches, reloads, and prints what the engine really served."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cb_lab.engine import EngineConfig, LLMEngine
from cb_lab.model.checkpoint import load_llama
from cb_lab.model.tokenizer import ByteTokenizer
from cb_lab.sampling import SamplingParams
from demos import demo_real_tokens

STEP = re.compile(r"^step\s+(\d+) \| decode\s+(\d+) \| prefill \[(.*)\]$", flags=re.M)
TEXT = re.compile(r"^    ('.*?')\s+-> (.*)$", flags=re.M)


def test_it_trains_caches_reloads_and_serves_what_the_engine_computes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--quick", "--cache-dir", str(tmp_path)]
    assert demo_real_tokens.main(argv) == 0
    first = capsys.readouterr().out
    losses = re.search(r"(\d+) steps; loss \(mean of each tenth\): ([\d. ]+)", first)
    assert losses and int(losses[1]) > 0
    assert demo_real_tokens.main(argv) == 0
    again = capsys.readouterr().out
    assert "loading the trained weights" in again and "training" not in again
    for match in STEP.finditer(again):
        chunks = [c for c in match[3].split(", ") if c]
        rows = sum(int(end) - int(start) for start, end in (c.split()[1].split(":") for c in chunks))
        assert int(match[2]) <= 8 and int(match[2]) + rows <= 48
        assert all(int(c.split()[1].split(":")[1]) - int(c.split()[1].split(":")[0]) <= 8 for c in chunks)
    # the last block of texts, recomputed with the cached model and the demo's own settings
    (folder,) = tmp_path.iterdir()
    model, _ = load_llama(folder)
    engine = LLMEngine(model, ByteTokenizer(), EngineConfig(max_num_seqs=8, block_size=8, num_blocks=128,
                                                            max_tokens_per_step=48, prefill_chunk_size=8))
    params = [SamplingParams(max_tokens=8 + 4 * (i % 5), temperature=0.7, seed=i, stop_token_ids=(10,))
              for i in range(len(demo_real_tokens.PROMPTS))]
    want = engine.generate(demo_real_tokens.PROMPTS, params)
    shown = TEXT.findall(again)[-len(want):]
    assert [eval(p) for p, _ in shown] == demo_real_tokens.PROMPTS  # noqa: S307 - the demo prints reprs
    assert [eval(t) for _, t in shown] == [o.text for o in want]  # noqa: S307
