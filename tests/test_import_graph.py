"""Imports point down: the import graph of ``cb_lab`` has no cycle, and the core stands alone.

Every ``import`` of a ``cb_lab`` module counts, at the top of a file or inside a function (a
function-level import is still a dependency, only a later one); imports under
``if TYPE_CHECKING:`` do not, since they never run. ``from cb_lab.x import y`` depends on the
module ``cb_lab.x.y`` when that is a module, else on ``cb_lab.x``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "cb_lab"
# The core may use the hook interfaces (plugins.base) and its own protocols, never what sits above them.
ABOVE_CORE = ("cb_lab.display", "cb_lab.plugins.builtin", "cb_lab.monitoring", "cb_lab.model")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_by(name: str) -> set[str]:
    tree = ast.parse(MODULES[name].read_text())
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and is_type_checking(node.test)
                 for stmt in node.body for n in ast.walk(stmt)}
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imported_by(name) for name in MODULES}


def find_cycle() -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_import_graph_has_no_cycle() -> None:
    cycle = find_cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_core_imports_nothing_above_it() -> None:
    upward = {(name, dep) for name, deps in GRAPH.items() if name.startswith("cb_lab.core")
              for dep in deps if dep.startswith(ABOVE_CORE)}
    assert not upward, f"core modules import display, plugin implementations, monitoring or model: {sorted(upward)}"


def test_the_graph_sees_function_level_imports() -> None:
    """The checker itself: an import inside a function is an edge, one under TYPE_CHECKING is not."""
    assert "cb_lab.cli_live" in GRAPH["cb_lab.cli"]  # inside live's handler: uvicorn only when it serves
    assert "cb_lab.engine" not in GRAPH["cb_lab.display.views"]  # imported for the type checker only
