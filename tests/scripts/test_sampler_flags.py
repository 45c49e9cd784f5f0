"""The sampler flags of the scripts (--sampler, --schedule, --eta, --guidance_rescale, the --plms / --dpm /
--dpm_solver aliases) end to end on the tiny runs, and a sampler registered by one line reaching the command line."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ldm.sampling import SAMPLERS, SamplerSpec
from ldm.sampling.samplers.euler import euler

SMALL = ["--H", "16", "--W", "16", "--steps", "4", "--n_samples", "2", "--n_iter", "1", "--scale", "3.0",
         "--device", "cpu", "--prompt", "a red circle"]


def read(path):
    with Image.open(path) as image:
        image.load()
        return np.asarray(image.convert("RGB")), dict(image.text)


def txt2img(scripts, text_run, out, *flags):
    assert scripts("txt2img").main([str(a) for a in ["-r", text_run.logdir, "--outdir", out, *SMALL, *flags]]) == 0
    return [read(out / "samples" / f"0000{i}.png") for i in (0, 1)]


def test_txt2img_sampler_schedule_eta_and_guidance_rescale(scripts, text_run, tmp_path):
    plain = txt2img(scripts, text_run, tmp_path / "a", "--sampler", "euler_ancestral")
    assert plain[0][1]["sampler"] == "euler_ancestral" and "eta" not in plain[0][1]
    again = txt2img(scripts, text_run, tmp_path / "b", "--sampler", "euler_ancestral")
    assert all(np.array_equal(p, q) for (p, _), (q, _) in zip(plain, again))  # seeded
    karras = txt2img(scripts, text_run, tmp_path / "c", "--sampler", "euler_ancestral", "--schedule", "exponential",
                     "--eta", "0.5", "--guidance_rescale", "0.7")
    meta = karras[0][1]
    assert meta["schedule"] == "exponential" and meta["eta"] == "0.5" and meta["guidance_rescale"] == "0.7"
    assert not np.array_equal(plain[0][0], karras[0][0])
    alias = txt2img(scripts, text_run, tmp_path / "d", "--dpm_solver")
    dpm = txt2img(scripts, text_run, tmp_path / "e", "--dpm")
    assert alias[0][1]["sampler"] == "dpm" and np.array_equal(alias[0][0], dpm[0][0])


@pytest.mark.parametrize("argv, message", [
    (["--sampler", "euler", "--eta", "0.5"], "sampler 'euler' draws no noise"),
    (["--sampler", "heun", "--plms"], "--sampler heun and --plms exclude each other"),
    (["--sampler", "euler", "--steps", "0"], "--steps must be at least 1"),
])
def test_flag_errors_are_one_line(scripts, text_run, tmp_path, capsys, argv, message):
    base = ["-r", text_run.logdir, "--H", "16", "--W", "16", "--n_samples", "1", "--device", "cpu",
            "--outdir", tmp_path / "out"]
    assert scripts("txt2img").main([str(a) for a in [*base, *argv]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert not (tmp_path / "out").exists()


def test_a_registered_sampler_reaches_the_command_line(scripts, text_run, tmp_path, monkeypatch):
    monkeypatch.setitem(SAMPLERS, "my_euler", SamplerSpec(euler, False, "karras", "zero", None, None, None))
    mine = txt2img(scripts, text_run, tmp_path / "mine", "--sampler", "my_euler")
    theirs = txt2img(scripts, text_run, tmp_path / "euler", "--sampler", "euler")
    assert mine[0][1]["sampler"] == "my_euler" and np.array_equal(mine[0][0], theirs[0][0])


def test_sample_diffusion_takes_the_sampler_flags(scripts, tiny_runs, tmp_path):
    uncond = tiny_runs("uncond")
    out = tmp_path / "sd"
    argv = ["-r", uncond.logdir, "-n", 2, "--batch_size", 2, "-c", 4, "-l", out, "--device", "cpu",
            "--sampler", "dpm2_ancestral", "--schedule", "karras"]
    assert scripts("sample_diffusion").main([str(a) for a in argv]) == 0
    pixels, meta = read(out / "sample_000000.png")
    assert meta["sampler"] == "dpm2_ancestral" and meta["schedule"] == "karras" and "eta" not in meta
