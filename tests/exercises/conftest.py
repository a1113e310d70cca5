"""Exercise checkers: ``make check PHASE=3`` (or ``pytest tests/exercises/test_phase3.py``) checks YOUR answers.

Each phase page of the learning path (``docs/learning_materials/``) ends with exercises.
Write your answer in ``tests/exercises/answers/phaseN.py`` (a number, a list, or a small
function, as the exercise says); the checker in ``test_phaseN.py`` computes the true value
with cb-lab itself and compares. An answer still ``None`` (or a function that still raises
``NotImplementedError``) is skipped with a hint that says where to write it (``-rs``, on in
the project's pytest options, prints the hints), so ``pytest tests`` passes before you start.
A wrong answer fails with what to reconsider, never with the expected value. To pick one phase
with ``-k``, end its name with ``_`` (``-k phase1_``): ``-k phase1`` also selects phases 10 to 13.

``CB_LAB_EXERCISES=solutions`` checks the reference answers in ``solutions/`` instead;
``make test`` does, so every checker is itself tested and can fail.

The checks run on one torch thread (their models are dim 8 to 64: a second thread buys nothing
and makes every step wait for a busy neighbour core), and a learner's check skips the
scheduler's per-step invariant checks (the suite's debug mode, which ``make test`` keeps on).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

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


@pytest.fixture(autouse=True)
def _quick_check(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One torch thread for the check (and the caller's count back after it); no invariant checks for a learner."""
    if answer_package() == "answers":
        monkeypatch.setenv("CB_LAB_CHECK_INVARIANTS", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
