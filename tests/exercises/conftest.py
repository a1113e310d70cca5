"""Exercise checkers: ``pytest tests/exercises -k phase3`` checks YOUR answers.

Each phase page of the learning path (``docs/learning_materials/``) ends with exercises.
Write your answer in ``tests/exercises/answers/phaseN.py`` (a number, a list, or a small
function, as the exercise says); the checker in ``test_phaseN.py`` computes the true value
with cb-lab itself and compares. An answer still ``None`` (or a function that still raises
``NotImplementedError``) is skipped with a hint, so ``pytest tests`` passes before you start.

``CB_LAB_EXERCISES=solutions`` checks the reference answers in ``solutions/`` instead;
``make test`` does, so every checker is itself tested and can fail.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


def answer_package() -> str:
    """``solutions`` when ``CB_LAB_EXERCISES=solutions``, else ``answers`` (yours)."""
    return "solutions" if os.environ.get("CB_LAB_EXERCISES") == "solutions" else "answers"


@pytest.fixture
def answers(request: pytest.FixtureRequest) -> ModuleType:
    """The answer module of the test module's phase (its ``PHASE``, e.g. ``"phase3"``)."""
    phase = request.module.PHASE
    return importlib.import_module(f"{answer_package()}.{phase}")
