"""scripts/sample_diffusion.py on tiny unconditional and class-conditional LDMs: PNGs, npz and sampling_config.yaml,
seeds that make every sample independent of the batch, ancestral sampling and user errors."""
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image


def run(scripts, argv):
    return scripts("sample_diffusion").main([str(a) for a in argv])


def read(folder):
    names = sorted(p.name for p in folder.glob("sample_*.png"))
    images = []
    for name in names:
        with Image.open(folder / name) as image:
            image.load()
            images.append((np.asarray(image.convert("RGB")), dict(image.text)))
    return names, images


def test_unconditional_ddim_writes_pngs_npz_and_config(scripts, tiny_runs, tmp_path):
    uncond = tiny_runs("uncond")
    out = tmp_path / "out"
    assert run(scripts, ["-r", uncond.logdir, "-n", 3, "--batch_size", 2, "-c", 4, "-l", out, "--device", "cpu"]) == 0
    names, images = read(out)
    assert names == ["sample_000000.png", "sample_000001.png", "sample_000002.png"]
    with np.load(out / "3x16x16x3-samples.npz") as data:
        assert list(data) == ["arr_0"]
        assert np.array_equal(data["arr_0"], np.stack([pixels for pixels, _ in images]))
    assert [meta["seed"] for _, meta in images] == ["0", "1", "2"]
    assert images[0][1]["sampler"] == "ddim" and images[0][1]["eta"] == "1.0" and images[0][1]["steps"] == "4"
    config = OmegaConf.load(out / "sampling_config.yaml").sampling
    assert config.n_samples == 3 and config.custom_steps == 4 and config.ckpt == str(uncond.ckpt)
    # eta = 1 draws fresh noise every step; per-sample seeds make each sample independent of the batch
    single = tmp_path / "single"
    assert run(scripts, ["-r", uncond.ckpt, "-n", 3, "--batch_size", 1, "-c", 4, "-l", single, "--device", "cpu"]) == 0
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(images, read(single)[1]))
    assert not np.array_equal(images[0][0], images[1][0])
    # a second run into the same folder numbers on
    assert run(scripts, ["-r", uncond.logdir, "-n", 1, "-c", 4, "-l", out, "--device", "cpu", "--seed", 7]) == 0
    assert read(out)[0][-1] == "sample_000003.png"


def test_vanilla_ancestral_sampling(scripts, tiny_runs, tmp_path):
    out = tmp_path / "out"
    assert run(scripts, ["-r", tiny_runs("uncond").logdir, "-n", 1, "-v", "-l", out, "--device", "cpu"]) == 0
    (pixels, meta), = read(out)[1]
    assert pixels.shape == (16, 16, 3) and meta["sampler"] == "ancestral" and "steps" not in meta


def test_class_conditional_labels_per_sample(scripts, tiny_runs, tmp_path):
    out = tmp_path / "out"
    assert run(scripts, ["-r", tiny_runs("class").logdir, "-n", 3, "--classes", 0, 2, "--scale", 2.0, "-c", 4,
                         "-e", 0.0, "-l", out, "--device", "cpu"]) == 0
    _, images = read(out)
    assert [meta["class_label"] for _, meta in images] == ["0", "2", "0"]
    with np.load(out / "3x16x16x3-samples.npz") as data:
        assert data["arr_1"].tolist() == [0, 2, 0]


@pytest.mark.parametrize("kind, extra, message", [
    ("text", [], "the model is conditioned on text; use scripts/txt2img.py"),
    ("class", ["--classes", "5"], "--classes: labels must lie in [0, 2], got [5]"),
    ("uncond", ["--classes", "1"], "--classes given but the model is unconditional"),
    ("uncond", ["-v", "--scale", "2"], "--scale needs DDIM sampling"),
    ("uncond", ["-c", "0"], "-c/--custom_steps must be at least 1"),
    (None, [], "-r/--resume: checkpoint '{tmp}/missing' does not exist"),
])
def test_user_errors(scripts, tiny_runs, tmp_path, capsys, kind, extra, message):
    source = tiny_runs(kind).logdir if kind else tmp_path / "missing"
    out = tmp_path / "out"
    assert run(scripts, ["-r", source, "-n", 2, "-c", 4, "-l", out, "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message.format(tmp=tmp_path) in err
    assert not out.exists()
