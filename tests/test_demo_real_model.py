"""demos/demo_real_model.py: the timeline it draws is the scheduler's, and every answer is what the engine
computes for that question alone (greedy). Skipped without the real model (make model)."""

from __future__ import annotations

import ast
import re

import pytest

from cb_lab.engine import EngineConfig, LLMEngine
from cb_lab.model.registry import DEFAULT_MODEL, model_file
from cb_lab.sampling import SamplingParams
from demos import demo_real_model

pytestmark = pytest.mark.skipif(model_file(DEFAULT_MODEL) is None, reason=f"{DEFAULT_MODEL} is not installed")
ROW = re.compile(r"^\s+(q\d+) ([PD. ]+)$", flags=re.M)
ANSWER = re.compile(r"^\[(q\d+)\] .*\n     (['\"].*['\"])\n     (\d+) tokens \((\w+)\)", flags=re.M)


def test_the_demo_prints_the_scheduler_timeline_and_each_answer(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_real_model.main(["--quick"]) == 0
    out = capsys.readouterr().out
    rows = dict(ROW.findall(out))
    assert list(rows) == [f"q{i}" for i in range(6)]
    arrive = demo_real_model.arrivals(6, first=4, every=2)
    for i, row in enumerate(rows.values()):
        assert row[: arrive[i]].strip() == "" and row.lstrip(" .")[0] == "P"  # nothing before it arrived
        assert set(row.strip(" .P")) == {"D"} and "P" not in row.strip(" .").lstrip("P")  # prefill, then decode
    engine = LLMEngine.from_pretrained(DEFAULT_MODEL, EngineConfig(block_size=16))
    answers = {m[0]: m for m in ANSWER.findall(out)}
    for i, q in enumerate(demo_real_model.QUESTIONS[:6]):
        alone = engine.chat([{"role": "system", "content": demo_real_model.SYSTEM}, {"role": "user", "content": q}],
                            SamplingParams(max_tokens=12, temperature=0.0))[0]
        _, text, n, reason = answers[f"q{i}"]
        assert ast.literal_eval(text) == alone.text.strip()
        assert int(n) == len(alone.token_ids) and reason == alone.finish_reason
        assert len(rows[f"q{i}"].strip(" .P")) == len(alone.token_ids) - 1  # the first token comes with the prefill
    saved = re.search(r"prefix cache: (\d+) of (\d+) prompt tokens", out)
    assert saved and int(saved[1]) > 0
    # The figures docs/learning_materials/phase14_real_model.md explains: step 0's budget of 128 takes q0 (45 tokens)
    # and q1 (44) whole and q2's first 39; q3 waits. The prompts share 32 tokens, 2 full blocks, which q0..q2 compute
    # in step 0 and q3 (admitted in step 1), q4 and q5 take: 3 x 32.
    prompts = [engine.chat_prompts([{"role": "system", "content": demo_real_model.SYSTEM},
                                    {"role": "user", "content": q}])[0] for q in demo_real_model.QUESTIONS[:6]]
    assert [len(p) for p in prompts][:3] == [45, 44, 44] and 42 == min(map(len, prompts)) < max(map(len, prompts)) == 46
    shared = next(i for i in range(len(prompts[0])) if len({p[i] for p in prompts}) > 1)
    assert shared == 32 and rows["q2"].startswith("PP") and rows["q3"].startswith(".P")
    assert (int(saved[1]), int(saved[2])) == (3 * 32, sum(map(len, prompts))) == (96, 265)
