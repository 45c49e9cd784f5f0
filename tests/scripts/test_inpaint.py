"""scripts/inpaint.py with an ordinary text model (mask applied in the sampler), latent-diffusion's concat inpainting
model and an SD 2 LatentInpaintDiffusion: the unmasked pixels stay the input's, the masked ones are painted."""
import numpy as np
import pytest
from PIL import Image

from ldm.data.shapes import ShapesValidation
from ldm.models.diffusion.task_models import LatentInpaintDiffusion  # noqa: F401 - under test: its absence fails

BASE = ["--steps", "4", "--device", "cpu"]


def pixels(path):
    with Image.open(path) as image:
        image.load()
        return np.asarray(image.convert("RGB")), dict(image.text)


def write_pair(folder, name, seed, size=16):
    """A shapes image and a mask whose right half (white) is to be filled."""
    folder.mkdir(parents=True, exist_ok=True)
    image = ShapesValidation(size=size, length=1, seed=seed)[0]["image"]
    Image.fromarray(((image + 1) * 127.5).round().astype(np.uint8)).save(folder / f"{name}.png")
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 2:] = 255
    Image.fromarray(mask).save(folder / f"{name}_mask.png")
    return folder / f"{name}.png", folder / f"{name}_mask.png"


def check_result(result, image_path):
    original, _ = pixels(image_path)
    keep = np.s_[:, :8]
    assert np.array_equal(result[keep], original[keep])  # unmasked: exactly the input
    assert not np.array_equal(result[:, 8:], original[:, 8:])  # masked: painted


def test_indir_pairs_with_an_ordinary_text_model(scripts, text_run, tmp_path):
    images = [write_pair(tmp_path / "in", name, seed)[0] for name, seed in (("a", 1), ("b", 2))]
    out = tmp_path / "out"
    args = ["-r", text_run.logdir, "--indir", tmp_path / "in", "--outdir", out, "--prompt", "a red circle",
            "--scale", "2.0", *BASE]
    assert scripts("inpaint").main([str(a) for a in args]) == 0
    for image in images:
        result, meta = pixels(out / image.name)
        check_result(result, image)
        assert meta["mode"] == "sampler-mask" and meta["prompt"] == "a red circle" and meta["mask"] == f"{image.stem}_mask.png"
    assert [pixels(out / n)[1]["seed"] for n in ("a.png", "b.png")] == ["42", "43"]
    first = pixels(out / "a.png")[0]
    assert scripts("inpaint").main([str(a) for a in args]) == 0  # same seed: same painting
    assert np.array_equal(first, pixels(out / "a.png")[0])


@pytest.mark.parametrize("kind, mode", [
    ("ldm-inpaint", "ldm-inpainting"),
    ("inpaint", "inpainting"),
])
def test_inpainting_checkpoints(scripts, tiny_runs, tmp_path, kind, mode):
    run = tiny_runs(kind)
    image, mask = write_pair(tmp_path / "in", "x", 3)
    out = tmp_path / "out"
    args = ["--ckpt", run.ckpt, "--image", image, "--mask", mask, "--outdir", out, "--prompt", "a blue square",
            "--scale", "3.0", *BASE]
    assert scripts("inpaint").main([str(a) for a in args]) == 0
    result, meta = pixels(out / "x.png")
    check_result(result, image)
    assert meta["mode"] == mode


@pytest.mark.parametrize("case, message", [
    ("size", "--mask: '{tmp}/in/x_mask.png' is 8x8 but its image '{tmp}/in/x.png' is 16x16"),
    ("unreadable", "--image: '{tmp}/in/x.png' is not a readable image"),
    ("odd", "both sides must be multiples of 8"),
    ("no-pairs", "holds no name_mask.png files"),
    ("both", "give either --indir or --image with --mask"),
])
def test_user_errors(scripts, text_run, tmp_path, capsys, case, message):
    image, mask = write_pair(tmp_path / "in", "x", 1, size=12 if case == "odd" else 16)
    if case == "size":
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(mask)
    if case == "unreadable":
        image.write_bytes(b"garbage")
    source = ["--image", image, "--mask", mask]
    if case == "no-pairs":
        source = ["--indir", tmp_path / "empty"]
        (tmp_path / "empty").mkdir()
    if case == "both":
        source += ["--indir", tmp_path / "in"]
    out = tmp_path / "out"
    code = scripts("inpaint").main([str(a) for a in ["-r", text_run.logdir, *source, "--outdir", out, *BASE]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    assert message.format(tmp=tmp_path) in err
    assert not out.exists()
