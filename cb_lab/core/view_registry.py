"""How an object draws itself in a notebook: it looks its view up here, by type.

The views (``cb_lab.display.views``) import the objects they draw, so an object cannot import its
view: imports point down. Instead ``cb_lab.display`` registers each view here, by the type it
draws, when it loads (``import cb_lab`` loads it), and ``_repr_html_`` asks for it.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from typing import Any

__all__ = ["register_view", "render"]

_VIEWS: dict[tuple[type, str], Callable[[Any], str]] = {}  # (type, "html" or "text") -> its view


def register_view(cls: type, view: Callable[[Any], str], kind: str = "html") -> None:
    """Draw objects of ``cls`` (and of its subclasses) with ``view``: ``"html"``, or ``"text"`` for ``repr``."""
    _VIEWS[(cls, kind)] = view


def render(obj: object, kind: str = "html") -> str:
    """``obj`` drawn by the view registered for its type or the nearest base; a plain repr if none is."""
    for cls in type(obj).__mro__:
        view = _VIEWS.get((cls, kind))
        if view is not None:
            return view(obj)
    plain = object.__repr__(obj)  # not repr(obj): a text view may be what __repr__ asks for
    return f"<pre>{escape(plain)}</pre>" if kind == "html" else plain
