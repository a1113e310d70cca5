"""Every command the docs show runs, so that a learner who copies one gets what the page says.

Commands are the lines of shell blocks (```bash) and the inline code spans that start with
``python -m`` or ``pytest``, in README.md and docs/ (English and ``_zh`` pages alike). How each
is run:

- ``python -m MODULE ARGS``: in this process, ``MODULE``'s ``main(ARGS + ["--quick"])`` (every
  demo, the main job, the serving CLI and the benchmarks take ``--quick``), in a temporary
  directory; it must return 0. Redirections (``2>/dev/null``) and comments are dropped. Standard
  input holds one line, ``STDIN`` (``python -m cb_lab chat`` answers it, then ends at end of input).
- ``pytest PATH... [-k NAME]``: every path exists and ``NAME`` (a plain substring, no
  ``and``/``or``) selects at least one test; the tests themselves run in this suite.
  ``pytest tests`` alone is this suite.
- A command that names ``cuda`` runs only where a CUDA device is; one whose module needs the real
  model (``NEEDS_MODEL``) only where it is installed (``make model``).
- Setup (``make``, ``pip``, ``python -m venv``, ``source``, ``cd``, ``git``...) is not run here;
  CI runs ``make test`` from a clean clone.
"""

from __future__ import annotations

import importlib
import io
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cb_lab.model.registry import DEFAULT_MODEL, model_file

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.DOTALL | re.MULTILINE)
INLINE = re.compile(r"(?<!`)`((?:python -m|pytest) [^`]+)`(?!`)")
SETUP_MODULES = {"venv", "pip"}
STDIN = "What is a KV cache?\n"
NEEDS_MODEL = {"demos.demo_real_model"}  # modules that stop (exit 1) without the real model


def _clean(line: str) -> str:
    line = line.split(" #", 1)[0].strip()
    return re.sub(r"\s*\d?>\s*/dev/null", "", line).strip()


def doc_commands() -> dict[str, list[str]]:
    """Command line -> the pages that show it (setup lines left out)."""
    found: dict[str, list[str]] = {}
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        lines = [ln for block in SHELL_BLOCK.findall(text) for ln in block.splitlines()]
        lines += INLINE.findall(SHELL_BLOCK.sub("", text))
        for line in map(_clean, lines):
            words = line.split()
            if words[:2] == ["python", "-m"] and len(words) > 2 and words[2] not in SETUP_MODULES or words[:1] == [
                "pytest"
            ]:
                found.setdefault(line, []).append(str(path.relative_to(ROOT)))
    return found


COMMANDS = doc_commands()
PYTHON_COMMANDS = sorted(c for c in COMMANDS if c.startswith("python -m"))
PYTEST_COMMANDS = sorted(c for c in COMMANDS if c.startswith("pytest") and c != "pytest tests")  # not the suite itself


def entry_point(module: str) -> Callable[[list[str]], int]:
    """``main`` of ``python -m module`` (a package runs its ``__main__``)."""
    mod = importlib.import_module(module)
    if not hasattr(mod, "main") and (ROOT / module.replace(".", "/") / "__main__.py").exists():
        mod = importlib.import_module(f"{module}.__main__")
    main: Callable[[list[str]], int] = mod.main
    return main


def test_the_docs_show_commands() -> None:
    assert len(PYTHON_COMMANDS) >= 10 and PYTHON_COMMANDS, COMMANDS


@pytest.mark.parametrize("command", PYTHON_COMMANDS)
def test_python_command_runs(command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    words = shlex.split(command)
    if "cuda" in words and not torch.cuda.is_available():
        pytest.skip(f"{command} needs a CUDA device")
    if words[2] in NEEDS_MODEL and model_file(DEFAULT_MODEL) is None:
        pytest.skip(f"{command} needs {DEFAULT_MODEL}: make model")
    argv = words[3:] + ([] if "--quick" in words else ["--quick"])
    monkeypatch.chdir(tmp_path)  # --plot out/, --save-workload w.csv ... write here
    monkeypatch.setattr("sys.stdin", io.StringIO(STDIN))
    threads = torch.get_num_threads()  # --threads 1 must not slow the rest of the suite
    try:
        code = entry_point(words[2])(argv)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0, f"{command} (shown in {COMMANDS[command]}) returned {code}:\n{out[-2000:]}"
    assert out.strip(), f"{command} printed nothing"


@pytest.fixture(scope="module")
def collected_tests() -> list[str]:
    argv = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-o", "addopts=", "-p", "no:cacheprovider", "tests"]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True)
    return [line for line in result.stdout.splitlines() if "::" in line]


@pytest.mark.parametrize("command", PYTEST_COMMANDS)
def test_pytest_command_selects_tests(command: str, collected_tests: list[str]) -> None:
    words = shlex.split(command)[1:]
    name = words[words.index("-k") + 1] if "-k" in words else None
    paths = [w for w in words if not w.startswith("-") and w != name]
    assert paths, f"{command}: name the tests to run"
    for path in paths:
        assert (ROOT / path.split("::")[0]).exists(), f"{command} (in {COMMANDS[command]}): no {path}"
    selected = [t for t in collected_tests if any(t.startswith(p) for p in paths)]
    if name is not None:
        assert " " not in name, f"{command}: -k takes one plain name here"
        selected = [t for t in selected if name in t]
    assert selected, f"{command} (shown in {COMMANDS[command]}) selects no test"
