"""The small HTML pieces every ``_repr_html_`` is built from: tables, coloured grids, bars.

Jupyter shows an object by calling its ``_repr_html_()`` when it has one (plain ``repr`` is the
fallback everywhere else). These helpers write plain HTML with inline styles, so a notebook,
a static HTML export and GitHub's viewer all show the same thing without a stylesheet or a
dependency. Everything they print is escaped: text becomes HTML only through :class:`Raw`,
which only these helpers make, so a request id like ``<script>`` shows as text.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence

__all__ = ["Cell", "Raw", "bar", "card", "escape", "grid", "image", "request_colour", "table"]

# Light colours, so black text stays readable on every one; a request keeps its colour by index.
_PALETTE = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d",
            "#9edae5", "#d9d9d9")
_FONT = "font-family:monospace;font-size:12px"
_CELL = "border:1px solid #ccc;padding:1px 4px;text-align:center;min-width:1.6em"


class Raw(str):
    """HTML that is already safe (built by these helpers); :func:`escape` passes it through."""

    __slots__ = ()


def escape(value: object) -> Raw:
    """``value`` as HTML text: ``<``, ``>``, ``&`` and quotes escaped, unless it is :class:`Raw` already."""
    return value if isinstance(value, Raw) else Raw(html.escape(str(value), quote=True))


def request_colour(index: int) -> str:
    """The background colour of the ``index``-th request of a picture (the palette repeats)."""
    return _PALETTE[index % len(_PALETTE)]


class Cell:
    """One square of a :func:`grid`: its text, background colour (``None``: blank) and tooltip."""

    __slots__ = ("colour", "text", "title")

    def __init__(self, text: object = "", colour: str | None = None, title: object = "") -> None:
        self.text, self.colour, self.title = text, colour, title

    def html(self) -> Raw:
        style = _CELL + (f";background:{self.colour}" if self.colour else "")
        title = f' title="{escape(self.title)}"' if self.title != "" else ""
        return Raw(f'<td style="{style}"{title}>{escape(self.text)}</td>')


def table(header: Sequence[object], rows: Sequence[Sequence[object]], *, name: str = "") -> Raw:
    """A plain table: one header row, then ``rows`` (each cell escaped; :class:`Raw` cells kept).

    ``name`` becomes the table's ``data-name`` attribute, so a test (or a reader of the
    source) can find a given table in a larger repr.
    """
    head = "".join(f'<th style="{_CELL}">{escape(h)}</th>' for h in header)
    body = "".join("<tr>" + "".join(f'<td style="{_CELL}">{escape(c)}</td>' for c in row) + "</tr>" for row in rows)
    return Raw(f'<table data-name="{escape(name)}" style="border-collapse:collapse;{_FONT}">'
               f"<tr>{head}</tr>{body}</table>")


def grid(rows: Sequence[Sequence[Cell]], *, row_labels: Sequence[object] = (), col_labels: Sequence[object] = (),
         name: str = "") -> Raw:
    """A coloured grid of :class:`Cell` s, with optional row and column labels (a mask, block tables)."""
    label = f'style="{_CELL};border:none;color:#666"'
    head = ""
    if col_labels:
        corner = "<th></th>" if row_labels else ""
        head = "<tr>" + corner + "".join(f"<th {label}>{escape(c)}</th>" for c in col_labels) + "</tr>"
    body = ""
    for i, row in enumerate(rows):
        start = f"<th {label}>{escape(row_labels[i])}</th>" if row_labels else ""
        body += "<tr>" + start + "".join(cell.html() for cell in row) + "</tr>"
    return Raw(f'<table data-name="{escape(name)}" style="border-collapse:collapse;{_FONT}">{head}{body}</table>')


def bar(done: int, total: int, *, width: int = 120, colour: str = "#1f77b4") -> Raw:
    """A progress bar ``width`` pixels wide, filled ``done / total`` (an empty total counts as done)."""
    fraction = 1.0 if total <= 0 else min(max(done / total, 0.0), 1.0)
    filled = round(fraction * width)
    return Raw(f'<span style="display:inline-block;width:{width}px;height:0.8em;background:#eee;'
               f'vertical-align:middle"><span data-filled="{filled}" style="display:block;width:{filled}px;'
               f'height:100%;background:{colour}"></span></span> {done}/{total}')


def card(title: object, parts: Sequence[object], figures: Mapping[str, object] | None = None) -> Raw:
    """An object's whole repr: a bold title, an optional line of ``name value`` figures, then ``parts``."""
    line = ""
    if figures:
        line = "<div>" + " &middot; ".join(f"{escape(k)} <b>{escape(v)}</b>" for k, v in figures.items()) + "</div>"
    body = "".join(f'<div style="margin-top:4px">{escape(p)}</div>' for p in parts)
    return Raw(f'<div style="{_FONT}"><b>{escape(title)}</b>{line}{body}</div>')


def image(png: bytes, alt: str) -> Raw:
    """A PNG inlined as a ``data:`` URL (a notebook keeps it in the cell's output)."""
    data = base64.b64encode(png).decode("ascii")
    return Raw(f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}" style="width:720px;max-width:100%">')
