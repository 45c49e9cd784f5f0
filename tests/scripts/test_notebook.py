"""notebooks/sample_demo.ipynb runs top to bottom (nbclient, a real kernel) on a tiny main.py-style run and shows
the grid of its samples."""
import base64
import io
from pathlib import Path

import nbformat
import pytest
from PIL import Image

import ipykernel  # noqa: F401 - the kernel nbclient starts (test extra)
import nbclient  # test extra

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "sample_demo.ipynb"


@pytest.mark.slow  # a kernel start and a fresh torch import: ~30 s
def test_notebook_loads_the_run_and_shows_the_grid(text_run, monkeypatch):
    monkeypatch.setenv("LDM_RUN", str(text_run.logdir))
    monkeypatch.setenv("LDM_STEPS", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    texts = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)
    assert f"run: {text_run.logdir}" in texts and "LatentDiffusion on cpu" in texts
    assert "torch.Size([4, 3, 16, 16])" in texts
    shown = [out for out in notebook.cells[-1].outputs if "image/png" in out.get("data", {})]
    assert len(shown) == 1
    grid = Image.open(io.BytesIO(base64.b64decode(shown[0]["data"]["image/png"])))
    assert grid.size == (4 * (4 * 16 + 5 * 2), 4 * (16 + 2 * 2))  # four samples in a row, 2-pixel gaps, zoom 4
