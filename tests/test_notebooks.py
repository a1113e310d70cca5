"""Every notebook under ``notebooks/`` (jupytext percent files) runs top to bottom on a fresh kernel.

A failing cell fails the test (nbclient raises ``CellExecutionError`` with the cell and its
traceback); each cell has ``CELL_TIMEOUT`` seconds.
"""

from __future__ import annotations

from pathlib import Path

import jupytext
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))
CELL_TIMEOUT = 120


def test_there_is_a_notebook_for_each_idea() -> None:
    assert [p.stem for p in NOTEBOOKS] == [
        "01_tour", "02_fused_step", "03_block_pool", "04_static_vs_continuous", "05_real_tokens", "06_prefix_caching",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_notebook_runs_top_to_bottom_on_a_fresh_kernel(path: Path) -> None:
    notebook = jupytext.read(path)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.execution_count for cell in code)  # every code cell ran
    html = [o for cell in code for o in cell.outputs if "text/html" in o.get("data", {})]
    assert html, f"{path.name} displays no cb-lab object"
