"""notebooks/sample_demo.ipynb, notebooks/latent_imagenet_diffusion.ipynb and notebooks/superresolution.ipynb run top
to bottom (nbclient, a real kernel) on tiny main.py-style runs and show the grid of their samples."""
import base64
import io
from pathlib import Path

import nbformat
import pytest
from PIL import Image

import ipykernel  # noqa: F401 - the kernel nbclient starts (test extra)
import nbclient  # test extra
from task_runs import sr_run

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "sample_demo.ipynb"
IMAGENET = NOTEBOOK.parent / "latent_imagenet_diffusion.ipynb"
SR_NOTEBOOK = NOTEBOOK.parent / "superresolution.ipynb"


def execute(path):
    """The notebook at `path`, executed in a fresh python3 kernel from its folder."""
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    return notebook


def printed(notebook):
    return "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)


def shown_image(cell):
    shown = [out for out in cell.outputs if "image/png" in out.get("data", {})]
    assert len(shown) == 1
    return Image.open(io.BytesIO(base64.b64decode(shown[0]["data"]["image/png"])))


@pytest.mark.slow  # a kernel start and a fresh torch import: ~30 s
def test_notebook_loads_the_run_and_shows_the_grid(text_run, monkeypatch):
    monkeypatch.setenv("LDM_RUN", str(text_run.logdir))
    monkeypatch.setenv("LDM_STEPS", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = execute(NOTEBOOK)
    texts = printed(notebook)
    assert f"run: {text_run.logdir}" in texts and "LatentDiffusion on cpu" in texts
    assert "torch.Size([4, 3, 16, 16])" in texts
    grid = shown_image(notebook.cells[-1])
    assert grid.size == (4 * (4 * 16 + 5 * 2), 4 * (16 + 2 * 2))  # four samples in a row, 2-pixel gaps, zoom 4


@pytest.mark.slow  # a kernel start and a fresh torch import: ~30 s
def test_imagenet_notebook_draws_each_class_with_guidance(tiny_runs, monkeypatch):
    """latent_imagenet_diffusion.ipynb on a tiny class-conditional model (3 classes + the null class): each class's
    row of the grid is DDIMSampler's guided samples from the notebook's seeds, against the null class."""
    import numpy as np
    import torch

    from ldm.inference import grid_image, load_model
    from ldm.models.diffusion.ddim import DDIMSampler

    run = tiny_runs("cin")
    for name, value in (("LDM_CONFIG", run.config), ("LDM_CKPT", run.ckpt), ("LDM_CLASSES", "2,0"),
                        ("LDM_SAMPLES_PER_CLASS", "3"), ("LDM_STEPS", "4"), ("LDM_SCALE", "2.5"), ("LDM_SEED", "7"),
                        ("LDM_DEVICE", "cpu"), ("OMP_NUM_THREADS", "1")):
        monkeypatch.setenv(name, str(value))
    notebook = execute(IMAGENET)
    texts = printed(notebook)
    assert "classes 4 null 3" in texts and "torch.Size([6, 3, 16, 16])" in texts
    assert "rendering 3 examples of class '2' in 4 steps and using s=2.50." in texts
    grid = np.asarray(shown_image(notebook.cells[-1]).convert("RGB"))
    _, model = load_model([str(run.config)], str(run.ckpt), torch.device("cpu"))
    rows = []
    with torch.no_grad():
        uc = model.get_learned_conditioning({"class_label": torch.tensor([3, 3, 3])})
        for i, label in enumerate((2, 0)):
            c = model.get_learned_conditioning({"class_label": torch.tensor([label] * 3)})
            z, _ = DDIMSampler(model).sample(4, 3, (4, 4, 4), c, verbose=False, unconditional_guidance_scale=2.5,
                                             unconditional_conditioning=uc, eta=0.0, seeds=[7 + 3 * i + k for k in range(3)])
            rows.append(model.decode_first_stage(z).clamp(-1, 1))
    expected = grid_image(torch.cat(rows), nrow=3)
    zoom = 256 // 16
    expected = np.asarray(expected.resize((expected.width * zoom, expected.height * zoom), Image.Resampling.NEAREST))
    assert grid.shape == expected.shape == ((2 * 16 + 3 * 2) * zoom, (3 * 16 + 4 * 2) * zoom, 3)  # 2-pixel gaps
    assert np.abs(grid.astype(int) - expected.astype(int)).max() <= 1
    assert not torch.allclose(rows[0], rows[1], atol=1e-3)  # two classes, two rows


@pytest.mark.slow  # a kernel start and a fresh torch import: ~30 s
def test_superresolution_notebook_upscales_beyond_the_training_size_in_patches(tmp_path, monkeypatch):
    """shapes-sr.yaml (shrunk) trained a few steps on ShapesSR (4x4 inputs -> 16x16) upscales an 8x8 shape to 32x32
    with split_input_params."""
    run, _ = sr_run(tmp_path)
    for name, value in (("LDM_RUN", run.logdir), ("LDM_STEPS", "4"), ("OMP_NUM_THREADS", "1")):
        monkeypatch.setenv(name, str(value))
    notebook = execute(SR_NOTEBOOK)
    texts = printed(notebook)
    assert f"run: {run.logdir}" in texts and "trained on 4x4 latents, f4" in texts
    assert "low-resolution input (1, 3, 8, 8) -> latent (8, 8)" in texts
    assert "patch-wise: True; output (1, 3, 32, 32)" in texts
    grid = shown_image(notebook.cells[-1])
    assert grid.size == (4 * (2 * 32 + 3 * 2), 4 * (32 + 2 * 2))  # input | upscaled, 2-pixel gaps, zoom 4
