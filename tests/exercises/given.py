"""``given(answers, NAME)``: your answer, or a skip that says where to write it.
``check(ok, hint)``: fail with what to reconsider, never with the expected value."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest


def given(answers: ModuleType, name: str) -> Any:
    """The value of ``name`` in the answer module; skips the check while it is still ``None``."""
    value = getattr(answers, name)
    if value is None:
        path = answers.__name__.replace(".", "/")
        pytest.skip(f"not answered yet: set {name} in tests/exercises/{path}.py")
    return value


def call(answers: ModuleType, name: str, *args: Any) -> Any:
    """Call your function ``name``; skips the check while it still raises NotImplementedError."""
    fn: Callable[..., Any] = getattr(answers, name)
    try:
        return fn(*args)
    except NotImplementedError:
        path = answers.__name__.replace(".", "/")
        pytest.skip(f"not answered yet: write {name} in tests/exercises/{path}.py")


def check(ok: bool, hint: str) -> None:
    """Fail the check with ``hint`` unless ``ok``.

    A plain ``assert answer == expected`` would print both values (pytest shows the operands of a
    failed assert, and the arguments of a helper in the traceback), so a second try would be a
    copy. ``ok`` is already a bool here, and the failure shows only the hint: what to reconsider.
    """
    if not ok:
        pytest.fail(f"not yet: {hint}", pytrace=False)
