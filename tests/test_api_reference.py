"""docs/api_reference.md lists exactly the public API, with the parameters the code has.

Public, for every module of ``cb_lab`` (``pkgutil.walk_packages``, ``__main__`` left out):

- the names in the module's ``__all__``; without ``__all__`` (only ``cb_lab.bench``), its
  top-level classes and functions not starting with ``_`` whose ``__module__`` is that module;
- each documented once, under its home: the ``__module__`` of a cb_lab class or function (so
  re-exports in ``cb_lab.monitoring`` and ``cb_lab.workload`` are not repeated), else the
  module whose ``__all__`` lists it (constants, type aliases);
- for each public class, the functions, static/class methods and properties in the class's
  own ``__dict__`` not starting with ``_``: nothing inherited (from ``object``, ``Exception``,
  ``nn.Module`` or a cb_lab base), no dataclass fields or other class attributes.

The page's format, parsed here (anything else on the page is free text)::

    ## cb_lab.core.scheduler                 a module; its entries follow, up to the next ##
    ### `plan_step(step_id, config) -> T`    a function: its parameters, then what it returns
    ### class `Scheduler(model, *, x=8)`     a class and its constructor's parameters; no
    ### class `CBLabException`               parentheses without a cb_lab __init__ (or a Protocol)
    ### `POLICIES`                           a constant or type alias
    - `add_request(req)`: text               a method of the class above (no self or cls)
    - `active`: text                         a property of the class above

A parameter list gives every name in order, ``=...`` where there is a default, ``*`` before
keyword-only ones and ``*args`` / ``**kwargs`` as such; the defaults' values are not checked.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import cb_lab

DOC = Path(__file__).resolve().parent.parent / "docs" / "api_reference.md"
MODULE = re.compile(r"^## (cb_lab[\w.]*)\s*$")
ENTRY = re.compile(r"^### (class )?`([^`]+)`\s*$")
MEMBER = re.compile(r"^- `([^`]+)`: \S")


def members(cls: type) -> dict[str, object]:
    return {n: v for n, v in vars(cls).items() if not n.startswith("_")
            and (inspect.isfunction(v) or isinstance(v, (property, staticmethod, classmethod)))}


def public_api() -> dict[tuple[str, str], object]:
    """(home module, "Name" or "Class.member") -> the object (a raw ``__dict__`` value for members)."""
    api: dict[tuple[str, str], object] = {}
    infos = pkgutil.walk_packages(cb_lab.__path__, "cb_lab.")
    for mod in [cb_lab, *(importlib.import_module(i.name) for i in infos if not i.name.endswith("__main__"))]:
        names = getattr(mod, "__all__", None)
        if names is None:
            names = [n for n, o in vars(mod).items() if not n.startswith("_")
                     and (inspect.isclass(o) or inspect.isfunction(o)) and o.__module__ == mod.__name__]
        for name in names:
            obj = getattr(mod, name)
            defined = (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__.startswith("cb_lab")
            home = obj.__module__ if defined else mod.__name__
            api[(home, name)] = obj
            if inspect.isclass(obj):
                api.update({(home, f"{name}.{m}"): v for m, v in members(obj).items()})
    return api


def parse_span(span: str) -> tuple[str, list[str] | None] | None:
    """``f(a, *, b=(1, 2)) -> T`` -> ``("f", ["a", "*", "b="])``, ``f`` -> ``("f", None)``, else None.

    The parameter list is split at top-level commas; each default is kept only as ``=``.
    """
    m = re.fullmatch(r"(\w+)(\(.*?\))?(?: -> .+)?", span)  # lazy: the first ")" that leaves a valid tail
    if m is None or m[2] is None:
        return None if m is None else (m[1], None)
    parts: list[str] = []
    depth, current = 0, ""
    for ch in m[2][1:-1] + ",":
        depth += (ch in "([{") - (ch in ")]}")
        parts, current = (parts + [current.strip()], "") if ch == "," and depth == 0 else (parts, current + ch)
    return m[1], [p.split("=")[0].strip() + ("=" if "=" in p else "") for p in parts if p]


def documented() -> tuple[dict[tuple[str, str], tuple[bool, list[str] | None]], list[str]]:
    """(module, name) -> (written as a class, its parameters or None); and the problems seen."""
    entries: dict[tuple[str, str], tuple[bool, list[str] | None]] = {}
    problems: list[str] = []
    module, entry = None, None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            module, entry = (m[1] if (m := MODULE.match(line)) else None), None
            continue
        heading = line.startswith("### ")
        m = (ENTRY if heading else MEMBER).match(line)
        if module is None or not (heading or entry and m):
            continue  # free text
        if (span := parse_span(m[2] if heading else m[1]) if m else None) is None:
            problems.append(f"unparsed line under {module}: {line!r}")
            entry = None if heading else entry
            continue
        entry = span[0] if heading else entry
        key = (module, span[0] if heading else f"{entry}.{span[0]}")
        problems += [f"{key} documented twice"] if key in entries else []
        entries[key] = (bool(heading and m and m[1]), span[1])
    return entries, problems


def expected_params(obj: object, member: bool) -> list[str] | None:
    """The parameter list the page must show for ``obj`` (None: no parentheses)."""
    if inspect.isclass(obj):
        owner = next(k for k in obj.__mro__ if "__init__" in vars(k))
        if not owner.__module__.startswith("cb_lab") or getattr(obj, "_is_protocol", False):
            return None
        params = list(inspect.signature(obj).parameters.values())  # without self
    elif isinstance(obj, (staticmethod, classmethod)):
        params = list(inspect.signature(obj.__func__).parameters.values())[isinstance(obj, classmethod):]
    elif inspect.isfunction(obj):
        params = list(inspect.signature(obj).parameters.values())[member:]  # a method: without self
    else:
        return None  # a property, a constant or a type alias
    tokens, star = [], False
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not star:
            tokens.append("*")
        star = star or p.kind in (p.KEYWORD_ONLY, p.VAR_POSITIONAL)
        prefix = "*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else ""
        tokens.append(prefix + p.name + ("=" if p.default is not p.empty else ""))
    return tokens


def test_every_public_name_is_documented_and_every_documented_name_exists() -> None:
    api, (docs, problems) = public_api(), documented()
    missing = sorted(set(api) - set(docs))
    unknown = sorted(set(docs) - set(api))
    assert not (missing or unknown or problems), (
        f"{DOC.name} is out of date.\npublic but undocumented: {missing}\n"
        f"documented but not public (renamed, removed or private?): {unknown}\nformat problems: {problems}"
    )
    assert len(docs) > 100  # the parser found the entries, not a few stray lines


def test_documented_parameters_match_the_signatures() -> None:
    api, (docs, _) = public_api(), documented()
    wrong = []
    for key, (as_class, params) in sorted(docs.items()):
        if key not in api:
            continue  # reported by the test above
        obj = api[key]
        expected = expected_params(obj, "." in key[1])
        if params != expected or as_class != ("." not in key[1] and inspect.isclass(obj)):
            wrong.append(f"{key[0]}: {key[1]} is written {'class ' if as_class else ''}{params}, "
                         f"the code has {'class ' if inspect.isclass(obj) else ''}{expected}")
    assert not wrong, f"{DOC.name} shows parameters the code does not have:\n" + "\n".join(wrong)
