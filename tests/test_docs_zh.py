"""The learning path in Chinese stays in step with the English pages.

Every English page of the path (``docs/learning_plan.md`` and ``docs/learning_materials/*.md``)
has a ``_zh`` twin with the same number of headings at each level, the same code blocks (the
commands and Python code a learner runs are not translated), and the same exercise check
commands, in the same order.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
ENGLISH = [DOCS / "learning_plan.md", *sorted(p for p in (DOCS / "learning_materials").glob("*.md")
                                             if not p.stem.endswith("_zh"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
CHECK = re.compile(r"`(pytest tests/exercises[^`]*)`")


def twin(path: Path) -> Path:
    return path.with_name(f"{path.stem}_zh.md")


def heading_levels(text: str) -> list[int]:
    prose = FENCE.sub("", text)
    return [len(m[1]) for m in re.finditer(r"^(#+) ", prose, flags=re.MULTILINE)]


def runnable_blocks(text: str) -> list[str]:
    """Shell and Python blocks, comments dropped (``text`` blocks are diagrams and may be translated)."""
    return ["\n".join(line.split("#", 1)[0].rstrip() if lang != "python" else line for line in body.splitlines())
            for lang, body in FENCE.findall(text) if lang in ("bash", "python")]


def test_the_path_has_pages() -> None:
    assert len(ENGLISH) >= 10


@pytest.mark.parametrize("page", ENGLISH, ids=lambda p: p.name)
def test_every_page_has_a_chinese_twin_in_step(page: Path) -> None:
    zh = twin(page)
    assert zh.exists(), f"{page.name} has no Chinese version {zh.name}"
    en_text, zh_text = page.read_text(encoding="utf-8"), zh.read_text(encoding="utf-8")
    assert heading_levels(zh_text) == heading_levels(en_text), f"{zh.name}: headings differ from {page.name}"
    assert runnable_blocks(zh_text) == runnable_blocks(en_text), f"{zh.name}: code blocks differ from {page.name}"
    assert CHECK.findall(zh_text) == CHECK.findall(en_text), f"{zh.name}: exercise checks differ from {page.name}"
    assert re.search(r"[\u4e00-\u9fff]", zh_text), f"{zh.name} is not in Chinese"
