"""Image variations end to end: the built-in shapes-unclip.yaml (shrunk; a small open_clip vision tower with random
weights as the frozen embedder) trains a few steps on shapes, and scripts/unclip.py varies input images with the
noise-augmented embedding as the vector, guidance against a zero embedding and per-sample seeds."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm import inference as inf
from ldm.data.shapes import ShapesTrain
from ldm.pipelines import ImageVariations
from ldm.sampling.noise import SeededNoise
from task_runs import (
    SAMPLER_FLAGS,
    assert_sampler_flags_reached,
    build,
    shipped_task_config,
    spy_sampling,
    train_steps,
    unclip_run,
)

BASE = ["--steps", "4", "--device", "cpu", "--n_samples", "2", "--H", "16", "--W", "16"]


@pytest.fixture(scope="module")
def unclip(tmp_path_factory):
    return unclip_run(tmp_path_factory.mktemp("unclip"))


def test_training_leaves_the_embedder_frozen(tmp_path):
    config = shipped_task_config("unclip", scale_by_std=False, scale_factor=0.5)
    model = build(config)
    embedder = {k: v.clone() for k, v in model.embedder.state_dict().items()}
    label = model.model.diffusion_model.label_emb[0][0].weight.detach().clone()
    assert all(np.isfinite(train_steps(model, ShapesTrain(size=16, length=12))))
    assert all(torch.equal(v, model.embedder.state_dict()[k]) for k, v in embedder.items())  # frozen
    assert not torch.equal(model.model.diffusion_model.label_emb[0][0].weight, label)  # the vector path trains


def shape_file(folder, index):
    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((ShapesTrain(size=16, length=index + 1)[index]["image"] + 1) * 127.5).round().astype(np.uint8)
    Image.fromarray(pixels).save(folder / f"shape{index}.png")
    return folder / f"shape{index}.png"


def read(path):
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def test_the_image_embedding_steers_with_guidance_against_a_zero_vector(unclip, tmp_path, monkeypatch):
    run, model = unclip
    a, b = shape_file(tmp_path, 0), shape_file(tmp_path, 1)
    job = ImageVariations(model, str(run.ckpt), steps=4, scale=3.0, image=read(a), image_path=str(a), noise_level=0)
    first = job(["", ""], [5, 6])
    torch.testing.assert_close(job([""], [6]).images, first.images[1:], atol=1e-5, rtol=0)  # per-sample seeds
    other = ImageVariations(model, str(run.ckpt), steps=4, scale=3.0, image=read(b), image_path=str(b))
    assert not torch.allclose(other(["", ""], [5, 6]).images, first.images)  # another image, other variations
    noisier = ImageVariations(model, str(run.ckpt), steps=4, scale=3.0, image=read(a), image_path=str(a),
                              noise_level=500)
    assert not torch.allclose(noisier(["", ""], [5, 6]).images, first.images)
    assert first.metadata[1] | {"seed": 6} == first.metadata[1] and first.metadata[0]["noise_level"] == 0
    seen = {}
    sample = inf.sample_latents
    monkeypatch.setattr(inf, "sample_latents", lambda *args, **kw: seen.update(c=args[2], uc=args[3]) or
                        sample(*args, **kw))
    job(["a red circle"], [5])
    noise = SeededNoise([5], model.device).randn((1, 64))  # the sample's own seed draws the augmentation noise
    emb = model.image_embedding(inf.image_to_tensor(read(a), model.device), noise_level=0, noise=noise)
    torch.testing.assert_close(seen["c"]["vector"], emb, atol=1e-6, rtol=0)
    assert not seen["uc"]["vector"].any() and seen["c"]["crossattn"].shape == seen["uc"]["crossattn"].shape


def test_script_varies_each_image_with_metadata(unclip, scripts, tmp_path):
    run, _ = unclip
    images = [shape_file(tmp_path, 0), shape_file(tmp_path, 1)]
    argv = ["-r", str(run.logdir), "--init-img", *map(str, images), "--noise_level", "100", "--scale", "2.0",
            "--outdir", str(tmp_path / "out"), *BASE]
    assert scripts("unclip").main(argv) == 0
    samples = sorted((tmp_path / "out" / "samples").glob("*.png"))
    assert len(samples) == 4 and len(list((tmp_path / "out").glob("grid-*.png"))) == 2
    with Image.open(samples[2]) as png:
        meta = dict(png.text)
    assert meta["init_image"] == "shape1.png" and meta["noise_level"] == "100" and meta["seed"] == "42"
    assert read(samples[0]).size == (16, 16)


def test_script_takes_the_sampler_flags_of_txt2img(unclip, scripts, tmp_path, monkeypatch):
    run, _ = unclip
    argv = ["-r", str(run.logdir), "--init-img", str(shape_file(tmp_path, 0)), "--scale", "2.0", *BASE]
    seen = spy_sampling(monkeypatch)
    assert scripts("unclip").main([*argv, *SAMPLER_FLAGS, "--outdir", str(tmp_path / "e")]) == 0
    with Image.open(tmp_path / "e" / "samples" / "00000.png") as png:
        assert_sampler_flags_reached(seen, dict(png.text))
    assert scripts("unclip").main([*argv, "--dpm", "--outdir", str(tmp_path / "d")]) == 0  # the original's flag
    with Image.open(tmp_path / "d" / "samples" / "00000.png") as png:
        assert png.text["sampler"] == "dpm"


@pytest.mark.parametrize("case, message", [
    ("level", "--noise_level must lie in [0, 1000), got 1000"),
    ("size", "--H 18 must be a positive multiple of 8"),
    ("missing", "--init-img: image '{tmp}/nowhere.png' does not exist"),
    ("not-unclip", "is not an image-variation model"),
])
def test_wrong_inputs_are_one_error_line(unclip, tiny_runs, scripts, tmp_path, capsys, case, message):
    run, _ = unclip
    image = shape_file(tmp_path, 0)
    logdir = tiny_runs("text").logdir if case == "not-unclip" else run.logdir
    extra = {"level": ["--noise_level", "1000"], "size": ["--H", "18"], "missing": [], "not-unclip": []}[case]
    init = str(tmp_path / "nowhere.png") if case == "missing" else str(image)
    argv = ["-r", str(logdir), "--init-img", init, "--outdir", str(tmp_path / "out"), *BASE, *extra]
    assert scripts("unclip").main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "out").exists()
