"""Argument checks for constructors and public entry points, written once.

Python's ``bool`` is an ``int`` (``isinstance(True, int)`` holds), so a bare ``isinstance`` would
take ``True`` for a block count; every check here refuses a bool where a number is asked for.
Each raises the caller's exception class (``ConfigurationError`` for a setting,
``ValidationError`` for an input) with the bad value in the message.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import TypeVar

from cb_lab.exceptions import CBLabException, ConfigurationError

__all__ = ["check_bool", "check_choice", "check_int", "check_number", "check_optional_int"]

T = TypeVar("T")


def check_int(name: str, value: object, low: int = 1, error: type[CBLabException] = ConfigurationError) -> int:
    """``value`` if it is an int >= ``low`` (not a bool), else ``error``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise error(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_optional_int(
    name: str, value: object, low: int = 1, error: type[CBLabException] = ConfigurationError
) -> int | None:
    """None, or an int >= ``low``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise error(f"{name} must be an int >= {low} or None, got {value!r}")
    return value


def check_number(
    name: str, value: object, low: float = 0.0, *, strict: bool = False,
    error: type[CBLabException] = ConfigurationError,
) -> float:
    """A finite int or float >= ``low`` (> ``low`` when ``strict``), as a float."""
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or value < low or (strict and value == low)):
        raise error(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")
    return float(value)


def check_bool(name: str, value: object, error: type[CBLabException] = ConfigurationError) -> bool:
    if not isinstance(value, bool):
        raise error(f"{name} must be a bool, got {value!r}")
    return value


def check_choice(name: str, value: T, choices: Collection[T], error: type[CBLabException] = ConfigurationError) -> T:
    """``value`` if it is one of ``choices`` (listed in the message, in their order)."""
    if not any(value == choice for choice in choices):  # not ``in``: an unhashable value is just not one
        raise error(f"{name} must be one of {list(choices)}, got {value!r}")
    return value
