"""notebooks/sample_demo.ipynb runs top to bottom (nbclient, a real kernel) on a tiny main.py-style run and shows
the grid of its samples."""
import base64
import io
from pathlib import Path

import nbformat
import pytest
from PIL import Image

from task_runs import sr_run

nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "sample_demo.ipynb"


def execute(path, run, monkeypatch, timeout):
    """The notebook at `path` executed top to bottom on `run` (4 steps, 1 thread): (notebook, its printed text)."""
    monkeypatch.setenv("LDM_RUN", str(run.logdir))
    monkeypatch.setenv("LDM_STEPS", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    texts = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)
    return notebook, texts


@pytest.mark.slow  # a kernel start and a fresh torch import: ~30 s
def test_notebook_loads_the_run_and_shows_the_grid(text_run, monkeypatch):
    notebook, texts = execute(NOTEBOOK, text_run, monkeypatch, timeout=120)
    assert f"run: {text_run.logdir}" in texts and "LatentDiffusion on cpu" in texts
    assert "torch.Size([4, 3, 16, 16])" in texts
    shown = [out for out in notebook.cells[-1].outputs if "image/png" in out.get("data", {})]
    assert len(shown) == 1
    grid = Image.open(io.BytesIO(base64.b64decode(shown[0]["data"]["image/png"])))
    assert grid.size == (4 * (4 * 16 + 5 * 2), 4 * (16 + 2 * 2))  # four samples in a row, 2-pixel gaps, zoom 4


SR_NOTEBOOK = NOTEBOOK.parent / "superresolution.ipynb"


@pytest.mark.slow  # a kernel start and a fresh torch import: ~30 s
def test_superresolution_notebook_upscales_beyond_the_training_size_in_patches(tmp_path, monkeypatch):
    """shapes-sr.yaml (shrunk) trained a few steps on ShapesSR (4x4 inputs -> 16x16) upscales an 8x8 shape to 32x32
    with split_input_params."""
    run, _ = sr_run(tmp_path)
    notebook, texts = execute(SR_NOTEBOOK, run, monkeypatch, timeout=180)
    assert f"run: {run.logdir}" in texts and "trained on 4x4 latents, f4" in texts
    assert "low-resolution input (1, 3, 8, 8) -> latent (8, 8)" in texts
    assert "patch-wise: True; output (1, 3, 32, 32)" in texts
    shown = [out for out in notebook.cells[-1].outputs if "image/png" in out.get("data", {})]
    grid = Image.open(io.BytesIO(base64.b64decode(shown[0]["data"]["image/png"])))
    assert grid.size == (4 * (2 * 32 + 3 * 2), 4 * (32 + 2 * 2))  # input | upscaled, 2-pixel gaps, zoom 4
