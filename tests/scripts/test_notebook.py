"""notebooks/sample_demo.ipynb runs top to bottom (nbclient, a real kernel) on a tiny main.py-style run and shows
the grid of its samples."""
import base64
import io
from pathlib import Path

import nbformat
import pytest
from PIL import Image

nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

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


SR_NOTEBOOK = NOTEBOOK.parent / "superresolution.ipynb"


@pytest.mark.slow  # a kernel start and a fresh torch import: ~30 s
def test_superresolution_notebook_upscales_beyond_the_training_size_in_patches(tiny_runs, monkeypatch):
    """The concat SR run (trained on 4x4 inputs -> 16x16) upscales a 8x8 shape to 32x32 with split_input_params."""
    run = tiny_runs("concat")
    monkeypatch.setenv("LDM_RUN", str(run.logdir))
    monkeypatch.setenv("LDM_STEPS", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(SR_NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(SR_NOTEBOOK.parent)}}).execute()
    texts = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)
    assert f"run: {run.logdir}" in texts and "trained on 4x4 latents, f4" in texts
    assert "low-resolution input (1, 3, 8, 8) -> latent (8, 8)" in texts
    assert "patch-wise: True; output (1, 3, 32, 32)" in texts
    shown = [out for out in notebook.cells[-1].outputs if "image/png" in out.get("data", {})]
    grid = Image.open(io.BytesIO(base64.b64decode(shown[0]["data"]["image/png"])))
    assert grid.size == (4 * (2 * 32 + 3 * 2), 4 * (32 + 2 * 2))  # input | upscaled, 2-pixel gaps, zoom 4
