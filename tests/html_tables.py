"""Read back the tables an HTML repr draws, so tests compare them with the object's state."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser


@dataclass
class Td:
    text: str
    style: str
    header: bool  # a <th>: a row or column label


@dataclass
class Table:
    name: str
    rows: list[list[Td]] = field(default_factory=list)

    def cells(self) -> list[list[Td]]:
        """The rows without their label cells (the column-label row too)."""
        return [[c for c in row if not c.header] for row in self.rows if not all(c.header for c in row)]

    def texts(self) -> list[list[str]]:
        return [[c.text for c in row] for row in self.cells()]


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables: list[Table] = []
        self._open: list[Table] = []  # nested tables: the innermost last
        self._cell: Td | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._open.append(Table(a.get("data-name") or ""))
            self.tables.append(self._open[-1])
        elif tag == "tr" and self._open:
            self._open[-1].rows.append([])
        elif tag in ("td", "th") and self._open:
            self._cell = Td("", a.get("style") or "", tag == "th")
            self._open[-1].rows[-1].append(self._cell)

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._open.pop()
        elif tag in ("td", "th"):
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.text += data


def tables(html: str) -> dict[str, Table]:
    """Every named table of ``html`` by its ``data-name`` (the first of each name)."""
    parser = _Parser()
    parser.feed(html)
    found: dict[str, Table] = {}
    for t in parser.tables:
        found.setdefault(t.name, t)
    return found
