"""scripts/img2img.py on the tiny text-conditioned LDM: strength 0 is the autoencoder's reconstruction, seeds
reproduce, the image is cropped to the downsampling factor, user errors are one line."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.shapes import ShapesValidation
from ldm.inference import encode_image, image_to_tensor, load_model, run_configs, to_uint8

PROMPT = "a blue square on a black background"
BASE = ["--prompt", PROMPT, "--steps", "4", "--n_samples", "2", "--scale", "2.0", "--device", "cpu", "--skip_grid"]


def pixels(path):
    with Image.open(path) as image:
        image.load()
        return np.asarray(image.convert("RGB")), dict(image.text)


@pytest.fixture
def init_image(tmp_path):
    image = ShapesValidation(size=16, length=1)[0]["image"]  # HWC in [-1, 1]
    path = tmp_path / "init.png"
    Image.fromarray(((image + 1) * 127.5).round().astype(np.uint8)).save(path)
    return path


def test_strength_zero_returns_the_autoencoder_reconstruction(scripts, text_run, tmp_path, init_image):
    out = tmp_path / "out"
    assert scripts("img2img").main([*map(str, ["-r", text_run.logdir, "--init-img", init_image, "--outdir", out,
                                               *BASE, "--strength", "0"])]) == 0
    _, model = load_model(run_configs(str(text_run.logdir)), str(text_run.ckpt), torch.device("cpu"))
    with Image.open(init_image) as image:
        x = image_to_tensor(image, torch.device("cpu"))
    with torch.no_grad():
        expected = to_uint8(model.decode_first_stage(encode_image(model, x)))[0].astype(int)
    for name in ("00000.png", "00001.png"):
        got, meta = pixels(out / "samples" / name)
        assert np.abs(got.astype(int) - expected).max() <= 1
        assert meta["strength"] == "0.0" and meta["t_enc"] == "0" and meta["init_image"] == "init.png"


def test_strength_renoises_reproducibly(scripts, text_run, tmp_path, init_image):
    args = ["-r", text_run.logdir, "--init-img", init_image, *BASE, "--strength", "0.5"]
    for out in ("a", "b"):
        assert scripts("img2img").main([*map(str, args), "--outdir", str(tmp_path / out)]) == 0
    (a0, meta), (a1, _) = (pixels(tmp_path / "a" / "samples" / f"0000{i}.png") for i in (0, 1))
    b0, _ = pixels(tmp_path / "b" / "samples" / "00000.png")
    assert np.array_equal(a0, b0) and not np.array_equal(a0, a1)
    assert meta["t_enc"] == "2" and meta["prompt"] == PROMPT and meta["sampler"] == "ddim"
    zero = tmp_path / "zero"
    assert scripts("img2img").main([*map(str, args[:-1]), "0", "--outdir", str(zero)]) == 0
    assert not np.array_equal(a0, pixels(zero / "samples" / "00000.png")[0])


def test_an_odd_sized_image_is_cropped_to_the_downsampling_factor(scripts, text_run, tmp_path):
    path = tmp_path / "odd.png"
    Image.fromarray(np.full((19, 21, 3), 200, np.uint8)).save(path)
    out = tmp_path / "out"
    assert scripts("img2img").main([*map(str, ["-r", text_run.logdir, "--init-img", path, "--outdir", out, *BASE,
                                               "--strength", "0.25", "--n_samples", "1"])]) == 0
    assert pixels(out / "samples" / "00000.png")[0].shape == (16, 16, 3)


@pytest.mark.parametrize("case, message", [
    ("unreadable", "--init-img: '{tmp}/bad.png' is not a readable image"),
    ("missing", "--init-img: image '{tmp}/none.png' does not exist"),
    ("strength", "--strength must lie in [0, 1], got 1.5"),
    ("tiny", "both sides must be at least 8 pixels"),
    ("ckpt", "--ckpt: checkpoint '{tmp}/no.ckpt' does not exist"),
])
def test_user_errors(scripts, text_run, tmp_path, init_image, capsys, case, message):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "tiny.png")
    image = {"unreadable": "bad.png", "missing": "none.png", "tiny": "tiny.png"}.get(case, "init.png")
    model = ["--ckpt", str(tmp_path / "no.ckpt")] if case == "ckpt" else ["-r", str(text_run.logdir)]
    strength = "1.5" if case == "strength" else "0.5"
    out = tmp_path / "out"
    code = scripts("img2img").main([*model, "--init-img", str(tmp_path / image), "--outdir", str(out), *BASE,
                                    "--strength", strength])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    assert message.format(tmp=tmp_path) in err
    assert not out.exists()
