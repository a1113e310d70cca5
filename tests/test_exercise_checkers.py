"""Every exercise checker can fail, and a failure says what to reconsider, never the expected value.

For each answer of each phase (``tests/exercises/solutions/phaseN.py``), the checks that read it
run against the reference answers with that one answer made wrong: a number moved by one, a list
shortened, a function whose result is changed. At least one check must fail, through
``given.check`` (a hint, no traceback), and the hint must not print the right value.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _pytest.outcomes import Failed

EXERCISES = Path(__file__).resolve().parent / "exercises"
if str(EXERCISES) not in sys.path:
    sys.path.insert(0, str(EXERCISES))
PHASES = sorted(int(p.stem.removeprefix("test_phase")) for p in EXERCISES.glob("test_phase*.py"))


def wrong(value: Any) -> Any:
    """A value that is not ``value`` (of the same kind, so the checks get past their type checks)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "_not"
    if isinstance(value, torch.Tensor):
        return ~value if value.dtype == torch.bool else value + 1
    if isinstance(value, dict):
        first = next(iter(value))
        return {**value, first: wrong(value[first])}
    if isinstance(value, list | tuple):
        changed = list(value[:-1]) if len(value) > 1 else [*value, *value] if value else [0]
        if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):  # a function's pieces
            changed = [wrong(value[0]), *value[1:]]
        return type(value)(changed)
    if callable(value):
        fn = value

        def wrong_fn(*args: Any) -> Any:
            return wrong(fn(*args))

        return wrong_fn
    raise AssertionError(f"no wrong value for {value!r}")


def answer_names(phase: int) -> list[str]:
    module = importlib.import_module(f"solutions.phase{phase}")
    return [n for n, v in vars(module).items() if not isinstance(v, types.ModuleType)
            and (n.isupper() or inspect.isfunction(v) and v.__module__ == module.__name__)]


CASES = [(phase, name) for phase in PHASES for name in answer_names(phase)]


def first_params(fn: Callable[..., Any]) -> dict[str, Any]:
    """The first parameter set of a parametrized check (none for a plain one)."""
    params: dict[str, Any] = {}
    for mark in getattr(fn, "pytestmark", []):
        if mark.name == "parametrize":
            names, values = mark.args
            names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
            first = values[0].values if hasattr(values[0], "values") else values[0]
            params |= dict(zip(names, first if len(names) > 1 else [first]))
    return params


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_phase_has_answers_to_check() -> None:
    assert PHASES == list(range(15)) and all(answer_names(p) for p in PHASES)


@pytest.mark.parametrize(("phase", "name"), CASES, ids=[f"phase{p}-{n}" for p, n in CASES])
def test_a_wrong_answer_fails_with_a_hint_and_not_the_answer(phase: int, name: str, one_thread: None) -> None:
    solutions = importlib.import_module(f"solutions.phase{phase}")
    checks = importlib.import_module(f"test_phase{phase}")
    right = getattr(solutions, name)
    answers = types.ModuleType(f"answers.phase{phase}")  # `given` names the file to write from this
    answers.__dict__.update({k: v for k, v in vars(solutions).items() if not k.startswith("__")})
    setattr(answers, name, wrong(right))
    readers = [fn for n, fn in vars(checks).items() if n.startswith("test_") and f'"{name}"' in inspect.getsource(fn)]
    assert readers, f"no check of phase {phase} reads {name}"
    hints = []
    for check in readers:
        params = first_params(check)
        with pytest.MonkeyPatch.context() as monkeypatch:
            if "monkeypatch" in inspect.signature(check).parameters:
                params["monkeypatch"] = monkeypatch
            try:
                check(answers, **params)
            except Failed as failure:  # given.check's pytest.fail(..., pytrace=False)
                assert not failure.pytrace, f"{check.__name__}: a wrong {name} should fail through given.check"
                hints.append(str(failure.msg))
    assert hints, f"phase {phase}: a wrong {name} passes every check that reads it"
    assert all(h.startswith("not yet: ") for h in hints)
    if not callable(right):
        shown = right[next(iter(right))] if isinstance(right, dict) else right
        for hint in hints:
            assert not re.search(rf"(?<![\w.]){re.escape(repr(shown))}(?![\w.])", hint), (
                f"the hint for {name} gives its answer {shown!r} away: {hint}")
