"""Super-resolution beyond the training size on built-in data: shapes-sr.yaml (shrunk) trains a few steps on ShapesSR
(4x4 -> 16x16 pairs), then scripts/superres.py upscales 8x8 inputs to 32x32 (the whole 8x8 latent, twice the trained
4x4), reproducibly, each output following its input; with split_input_params the same model samples that latent in
4x4 patches (the superresolution notebook's setting; the notebook itself runs on this model in test_notebook.py)."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm import inference as inf
from ldm.data.shapes import ShapesSR
from ldm.models.diffusion.ddim import DDIMSampler
from task_runs import sr_run

BASE = ["--steps", "4", "--device", "cpu"]
PATCHES = {"ks": (4, 4), "stride": (2, 2), "vqf": 4, "patch_distributed_vq": True, "tie_braker": False,
           "clip_max_weight": 0.5, "clip_min_weight": 0.01, "clip_max_tie_weight": 0.5, "clip_min_tie_weight": 0.01}


@pytest.fixture(scope="module")
def sr(tmp_path_factory):
    return sr_run(tmp_path_factory.mktemp("sr"))


def low_res(folder, index):
    """The 8x8 input of a 32x32 validation shape, as a PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    low = ShapesSR(size=32, length=2, split="validation")[index]["LR_image"]
    Image.fromarray(np.round((low + 1) * 127.5).astype(np.uint8)).save(folder / f"low{index}.png")
    return folder / f"low{index}.png"


def pixels(path):
    with Image.open(path) as image:
        image.load()
        return np.asarray(image.convert("RGB"))


def test_superres_upscales_inputs_larger_than_trained(sr, scripts, tmp_path):
    run, model = sr
    assert model.image_size == 4  # trained on 4x4 latents
    images = [low_res(tmp_path / "in", 0), low_res(tmp_path / "in", 1)]
    for out in ("x", "y"):
        argv = ["-r", run.logdir, "--image", *images, "--outdir", tmp_path / out, *BASE]
        assert scripts("superres").main([str(a) for a in argv]) == 0
    a, b = pixels(tmp_path / "x" / "low0.png"), pixels(tmp_path / "x" / "low1.png")
    assert a.shape == (32, 32, 3)
    assert np.array_equal(a, pixels(tmp_path / "y" / "low0.png"))  # seeded
    assert not np.array_equal(a, b)  # another input, another output


def test_the_trained_model_samples_a_larger_latent_in_patches(sr):
    _, model = sr
    low = torch.from_numpy(ShapesSR(size=32, length=1, split="validation")[0]["LR_image"]).permute(2, 0, 1)[None]
    outputs, calls = {}, []
    for split in (False, True):
        if split:
            model.split_input_params = PATCHES
        unet = model.model.diffusion_model
        hook = unet.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape[-2:])))
        try:
            with torch.no_grad():
                c = model.get_learned_conditioning(low)
                z, _ = DDIMSampler(model).sample(S=2, batch_size=1, shape=(4, 8, 8), conditioning={"concat": c},
                                                 eta=0.0, verbose=False, seeds=[0])
                outputs[split] = model.decode_first_stage(z)
        finally:
            hook.remove()
            model.__dict__.pop("split_input_params", None)
    assert outputs[False].shape == outputs[True].shape == (1, 3, 32, 32)
    assert set(calls) == {(8, 8), (4, 4)}  # whole, then the UNet saw 4x4 patches only
    assert inf.to_uint8(outputs[True]).std() > 0 and not torch.allclose(outputs[False], outputs[True])
