"""Request specs, a workload as plain data, and their files: ``.json`` or ``.csv``.

A :class:`RequestSpec` is one request without tensors: when it arrives and its lengths in
tokens. Saved to a file, a workload lets two runs (two schedulers, two machines, a replayed
production trace) see exactly the same requests. The fields, also the CSV header::

    req_id,arrival_step,prompt_len,max_new_tokens,prefix_id,prefix_len
    r000,0,37,12,,0
    r001,2,40,128,1,16

JSON holds a list of objects with these keys. An empty ``prefix_id`` (JSON ``null``) means no
shared prefix; a file written by hand may leave ``prefix_id`` and ``prefix_len`` out. Loading
checks every field of every row and raises ``ValidationError`` naming the file, the row (CSV
line or JSON item) and the field. ``cb_lab.workload`` generates specs and builds requests.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

from cb_lab.exceptions import ConfigurationError, ValidationError

logger = logging.getLogger(__name__)

__all__ = ["FIELDS", "RequestSpec", "load_workload", "save_workload"]


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request as plain data (lengths in tokens, no tensors yet); what workload files hold.

    Requests with the same ``prefix_id`` share their first ``prefix_len`` prompt rows.
    """

    req_id: str
    arrival_step: int
    prompt_len: int
    max_new_tokens: int
    prefix_id: int | None = None
    prefix_len: int = 0

    def __post_init__(self) -> None:
        if problem := spec_problem({f: getattr(self, f) for f in FIELDS}):
            raise ConfigurationError(f"RequestSpec {problem[0]} {problem[1]}")


FIELDS = tuple(f.name for f in fields(RequestSpec))  # also the CSV header, in this order
_REQUIRED = FIELDS[:4]


def spec_problem(v: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first bad field of a request spec and what is wrong with it, or None."""
    if not isinstance(v["req_id"], str) or not v["req_id"]:
        return "req_id", f"must be a non-empty string, got {v['req_id']!r}"
    for name, low in (("arrival_step", 0), ("prompt_len", 1), ("max_new_tokens", 0), ("prefix_len", 0)):
        if isinstance(v[name], bool) or not isinstance(v[name], int) or v[name] < low:
            return name, f"must be an int >= {low}, got {v[name]!r}"
    pid, plen = v["prefix_id"], v["prefix_len"]
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid < 0):
        return "prefix_id", f"must be an int >= 0, or empty for no shared prefix, got {pid!r}"
    if (pid is None) != (plen == 0):
        return "prefix_len", f"is {plen} with prefix_id {pid!r}; a shared prefix needs both (prefix_len >= 1)"
    if plen > v["prompt_len"]:
        return "prefix_len", f"{plen} is longer than prompt_len {v['prompt_len']}; a prefix is part of the prompt"
    return None


def workload_problem(specs: Sequence[RequestSpec]) -> str | None:
    """What makes a list of (valid) specs inconsistent, or None."""
    seen: dict[str, int] = {}
    first_of_prefix: dict[int, RequestSpec] = {}
    for i, s in enumerate(specs):
        if s.req_id in seen:
            return f"req_id {s.req_id!r} appears at {seen[s.req_id]} and {i}; give every request its own id"
        seen[s.req_id] = i
        if s.prefix_id is not None and (first := first_of_prefix.setdefault(s.prefix_id, s)).prefix_len != s.prefix_len:
            return (f"prefix_id {s.prefix_id} is {first.prefix_len} rows in {first.req_id!r} but {s.prefix_len} in "
                    f"{s.req_id!r}; one prefix has one prefix_len")
    return None


def check_specs(specs: object) -> list[RequestSpec]:
    """``specs`` as a list, or ConfigurationError: the boundary check of build_requests and save_workload."""
    if not isinstance(specs, Sequence) or not all(isinstance(s, RequestSpec) for s in specs):
        raise ConfigurationError("specs must be a sequence of RequestSpec (from generate_workload or load_workload)")
    if problem := workload_problem(specs):
        raise ConfigurationError(problem)
    return list(specs)


# --- files ------------------------------------------------------------------------------------


def _workload_path(path: str | Path) -> tuple[Path, str]:
    if not isinstance(path, (str, Path)):
        raise ConfigurationError(f"path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    if path.suffix.lower() not in (".json", ".csv"):
        raise ConfigurationError(f"workload file {path}: unknown suffix {path.suffix!r}; name it .json or .csv")
    return path, path.suffix.lower()


def save_workload(specs: Sequence[RequestSpec], path: str | Path) -> None:
    """Write specs to ``path``, as JSON or CSV by its suffix."""
    specs = check_specs(specs)
    path, suffix = _workload_path(path)
    rows = [{f: getattr(s, f) for f in FIELDS} for s in specs]
    try:
        f = path.open("w", encoding="utf-8", newline="")
    except OSError as e:  # a missing folder, a read-only place: named here, not as a traceback
        raise ConfigurationError(f"cannot write the workload file {path}: {e.strerror}; give a path in a folder "
                                 "you can write to") from None
    with f:
        if suffix == ".json":
            f.write(json.dumps(rows, indent=1) + "\n")
        else:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    logger.debug("saved %d request specs to %s", len(rows), path)


def _int_or_text(cell: object) -> object:
    """A CSV cell as an int where it is one; other text stays text, for the field check to name."""
    if not isinstance(cell, str):
        return cell  # None (a short row) or a list (cells beyond the header)
    if not cell.strip():
        return None
    try:
        return int(cell)
    except ValueError:
        return cell


def load_workload(path: str | Path) -> list[RequestSpec]:
    """Read specs from a ``.json`` or ``.csv`` file (see the module docstring)."""
    path, suffix = _workload_path(path)
    if not path.is_file():
        raise ConfigurationError(f"workload file {path} does not exist; check the path (save_workload writes one)")
    text = path.read_text(encoding="utf-8")

    def fail(where: str, message: str) -> NoReturn:
        raise ValidationError(f"workload file {path}, {where}: {message}; the fields are {','.join(FIELDS)}")

    rows: list[tuple[str, Mapping[str, Any]]] = []  # (where, fields)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            fail(f"line {e.lineno}", f"not valid JSON ({e.msg}); write a list of objects, one per request")
        if not isinstance(data, list):
            fail("top level", f"must be a list of objects, one per request, got {type(data).__name__}")
        for i, item in enumerate(data):
            if not isinstance(item, dict):
                fail(f"item {i}", f"must be an object with the fields, got {type(item).__name__}")
            rows.append((f"item {i}", item))
    else:
        reader = csv.DictReader(io.StringIO(text), restkey="<cells beyond the header>")
        if missing := [f for f in _REQUIRED if f not in (reader.fieldnames or [])]:
            fail("line 1 (the header)", f"column(s) {missing} missing")
        for record in reader:
            cells: dict[str, Any] = {k: v if k == "req_id" else _int_or_text(v) for k, v in record.items()}
            rows.append((f"line {reader.line_num}", cells))
    specs = []
    for where, row in rows:
        if unknown := [k for k in row if k not in FIELDS]:
            fail(where, f"unknown field(s) {unknown}")
        values: dict[str, Any] = {"prefix_id": None, "prefix_len": 0}
        values.update((k, v) for k, v in row.items() if v is not None and v != "")
        if missing := [f for f in _REQUIRED if f not in values]:
            fail(where, f"field(s) {missing} missing")
        if problem := spec_problem(values):
            fail(where, f"field {problem[0]!r} {problem[1]}")
        specs.append(RequestSpec(**values))
    if problem_text := workload_problem(specs):
        fail("rows", problem_text)
    return specs
