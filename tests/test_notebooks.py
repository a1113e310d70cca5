"""Every notebook under ``notebooks/`` (jupytext percent files) runs top to bottom on a fresh kernel.

A failing cell fails the test (nbclient raises ``CellExecutionError`` with the cell and its
traceback); each cell has ``CELL_TIMEOUT`` seconds. A notebook that needs the real model
(``NEEDS_MODEL``) is skipped where it is not installed (``make model``).
"""

from __future__ import annotations

from pathlib import Path

import jupytext
import pytest
from nbclient import NotebookClient

from cb_lab.model.registry import DEFAULT_MODEL, model_file

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))
CELL_TIMEOUT = 120
NEEDS_MODEL = {"07_real_model": DEFAULT_MODEL}


def case(path: Path) -> object:
    """``path`` as a test case, skipped when it needs a model that is not installed."""
    name = NEEDS_MODEL.get(path.stem)
    missing = name is not None and model_file(name) is None
    return pytest.param(path, id=path.stem, marks=pytest.mark.skipif(missing, reason=f"{name} is not installed: "
                                                                                        "make model"))


def test_there_is_a_notebook_for_each_idea() -> None:
    assert [p.stem for p in NOTEBOOKS] == [
        "01_tour", "02_fused_step", "03_block_pool", "04_static_vs_continuous", "05_real_tokens", "06_prefix_caching",
        "07_real_model",
    ]


@pytest.mark.parametrize("path", [case(p) for p in NOTEBOOKS])
def test_the_notebook_runs_top_to_bottom_on_a_fresh_kernel(path: Path) -> None:
    notebook = jupytext.read(path)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.execution_count for cell in code)  # every code cell ran
    html = [o for cell in code for o in cell.outputs if "text/html" in o.get("data", {})]
    assert html, f"{path.name} displays no cb-lab object"
