"""Depth-to-image end to end: the built-in shapes-depth2img.yaml (shrunk) trains a few steps on ShapesScenes' depth,
a variant with a real MiDaS network (random weights) as the depth stage trains on AddMiDaS inputs, and
scripts/depth2img.py samples both (the given depth image, or MiDaS' estimate of the init image) with guidance and
per-sample seeds; wrong inputs are one error line."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.shapes import ShapesScenesTrain
from ldm.data.util import AddMiDaS
from ldm.pipelines import Depth2Img
from task_runs import build, depth_run, save_run, shipped_task_config, train_steps

BASE = ["--steps", "4", "--device", "cpu", "--n_samples", "2", "--prompt", "a red circle on a white background"]
MIDAS = {"target": "ldm.modules.midas.api.MiDaSInference", "params": {"model_type": "midas_v21_small",
                                                                      "model_path": None}}


@pytest.fixture(scope="module")
def depth_runs(tmp_path_factory):
    """'data': the built-in config on the scenes' depth; 'midas': MiDaS (random weights) on AddMiDaS inputs."""
    root = tmp_path_factory.mktemp("depth")
    runs = {"data": depth_run(root / "data")}
    config = shipped_task_config("depth2img", scale_by_std=False, scale_factor=0.5, concat_keys=["midas_in"],
                                 depth_stage_config=MIDAS)
    model = build(config)
    add = AddMiDaS("midas_v21_small")
    data = [add({**e, "jpg": e["image"]}) for e in ShapesScenesTrain(size=16, length=4)]
    before = model.model.diffusion_model.input_blocks[0][0].weight[:, 4:].detach().clone()
    assert all(np.isfinite(train_steps(model, data, steps=2, batch_size=2)))
    assert not torch.equal(model.model.diffusion_model.input_blocks[0][0].weight[:, 4:], before)  # the depth trains
    runs["midas"] = (save_run(root, "midas", config, model), model.eval())
    return runs


def scene_files(folder, index):
    """A scene and its depth (x 255) as PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    example = ShapesScenesTrain(size=16, length=index + 1)[index]
    Image.fromarray(((example["image"] + 1) * 127.5).round().astype(np.uint8)).save(folder / f"scene{index}.png")
    Image.fromarray((example["depth"][0] * 255).round().astype(np.uint8), mode="L").save(folder / f"depth{index}.png")
    return folder / f"scene{index}.png", folder / f"depth{index}.png"


def read(path, mode="RGB"):
    with Image.open(path) as image:
        image.load()
        return image.convert(mode)


def test_depth_steers_seeds_are_per_sample_and_strength_one_ignores_the_image(depth_runs, tmp_path):
    run, model = depth_runs["data"]
    (img0, dep0), (img1, dep1) = scene_files(tmp_path, 1), scene_files(tmp_path, 2)
    prompts = ["a red circle on a white background"] * 2
    job = Depth2Img(model, str(run.ckpt), steps=4, scale=3.0, image=read(img0), image_path=str(img0), strength=1.0,
                    depth_image=read(dep0, "L"), depth_path=str(dep0))
    assert job.depth.shape == (1, 1, 4, 4) and job.depth.min() == -1 and job.depth.max() > 0.99
    both = job(prompts, [7, 8])
    torch.testing.assert_close(job(prompts[:1], [8]).images, both.images[1:], atol=1e-5, rtol=0)  # per sample
    other_image = Depth2Img(model, str(run.ckpt), steps=4, scale=3.0, image=read(img1), image_path=str(img1),
                            strength=1.0, depth_image=read(dep0, "L"), depth_path=str(dep0))
    torch.testing.assert_close(other_image(prompts, [7, 8]).images, both.images)  # strength 1: depth + prompt only
    other_depth = Depth2Img(model, str(run.ckpt), steps=4, scale=3.0, image=read(img0), image_path=str(img0),
                            strength=1.0, depth_image=read(dep1, "L"), depth_path=str(dep1))
    assert not torch.allclose(other_depth(prompts, [7, 8]).images, both.images)  # the depth steers
    partial = Depth2Img(model, str(run.ckpt), steps=4, scale=3.0, image=read(img1), image_path=str(img1),
                        strength=0.5, depth_image=read(dep0, "L"), depth_path=str(dep0))
    assert not torch.allclose(partial(prompts, [7, 8]).images, both.images)  # below 1 the init image matters
    assert both.metadata[0]["depth_image"] == "depth1.png" and both.metadata[1]["seed"] == 8


@pytest.mark.parametrize("kind", ["data", "midas"])
def test_script_writes_samples_grid_and_the_depth(depth_runs, scripts, tmp_path, kind):
    run, _ = depth_runs[kind]
    image, depth = scene_files(tmp_path, 0)
    extra = ["--depth-img", str(depth)] if kind == "data" else []
    argv = ["-r", str(run.logdir), "--init-img", str(image), "--strength", "0.75", "--scale", "2.0",
            "--outdir", str(tmp_path / "out"), *BASE, *extra]
    assert scripts("depth2img").main(argv) == 0
    samples = sorted((tmp_path / "out" / "samples").glob("*.png"))
    assert len(samples) == 2 and (tmp_path / "out" / "grid-0000.png").exists()
    with Image.open(samples[1]) as png:
        meta = dict(png.text)
        assert png.size == (16, 16)
    assert meta["seed"] == "43" and meta["strength"] == "0.75" and meta["scale"] == "2.0"
    assert meta.get("depth_image") == "depth0.png" if kind == "data" else meta["depth"] == "midas midas_v21_small"
    assert read(tmp_path / "out" / "depth.png").size == (4, 4)  # the depth the UNet read, at the latent size


@pytest.mark.parametrize("case, message", [
    ("strength", "--strength must lie in [0, 1], got 1.5"),
    ("no-depth", "--depth-img: the depth stage of"),
    ("missing-depth", "--depth-img: image '{tmp}/nowhere.png' does not exist"),
    ("not-depth", "is not a depth-to-image model"),
])
def test_wrong_inputs_are_one_error_line(depth_runs, tiny_runs, scripts, tmp_path, capsys, case, message):
    run, _ = depth_runs["data"]
    image, depth = scene_files(tmp_path, 0)
    logdir = tiny_runs("text").logdir if case == "not-depth" else run.logdir
    extra = {"strength": ["--strength", "1.5", "--depth-img", str(depth)], "no-depth": [],
             "missing-depth": ["--depth-img", str(tmp_path / "nowhere.png")], "not-depth": []}[case]
    argv = ["-r", str(logdir), "--init-img", str(image), "--outdir", str(tmp_path / "out"), *BASE, *extra]
    assert scripts("depth2img").main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "out").exists()
