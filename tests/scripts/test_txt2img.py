"""scripts/txt2img.py end to end on a tiny text-conditioned LDM (16x16 images, 4x4x4 latents)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PROMPT = "a red circle on a white background"
SMALL = ["--H", "16", "--W", "16", "--steps", "4", "--n_samples", "2", "--n_iter", "1", "--scale", "3.0",
         "--device", "cpu"]


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def text_chunks(path):
    with Image.open(path) as image:
        image.load()
        return dict(image.text)


def run(scripts, argv):
    return scripts("txt2img").main([str(a) for a in argv])


@pytest.mark.parametrize("sampler", [[], ["--plms"], ["--dpm"]], ids=["ddim", "plms", "dpm"])
def test_each_sampler_writes_samples_and_grid_with_metadata(scripts, text_run, tmp_path, sampler):
    out = tmp_path / "out"
    assert run(scripts, ["-r", text_run.logdir, "--prompt", PROMPT, "--outdir", out, *SMALL, *sampler]) == 0
    samples = sorted((out / "samples").iterdir())
    assert [p.name for p in samples] == ["00000.png", "00001.png"]
    assert pixels(samples[0]).shape == (16, 16, 3)
    meta = text_chunks(samples[1])
    name = {"--plms": "plms", "--dpm": "dpm"}.get(sampler[0] if sampler else None, "ddim")
    assert meta["prompt"] == PROMPT and meta["seed"] == "43" and meta["sampler"] == name
    assert meta["steps"] == "4" and meta["scale"] == "3.0"
    assert meta["checkpoint"] == f"{text_run.logdir.name}/last.ckpt"
    assert ("eta" in meta) == (name == "ddim")
    grid = out / "grid-0000.png"
    assert pixels(grid).shape == (16 + 4, 2 * 16 + 6, 3)  # one row of two, 2-pixel gaps
    assert text_chunks(grid)["seed"] == "[42, 43]"
    assert not list(out.rglob(".*.tmp"))


def test_fixed_seed_reproduces_images_and_new_files_never_overwrite(scripts, text_run, tmp_path):
    out = tmp_path / "out"
    args = ["--ckpt", text_run.ckpt, "--prompt", PROMPT, "--outdir", out, *SMALL]
    assert run(scripts, args) == 0
    assert run(scripts, args) == 0
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert sorted(p.name for p in out.glob("grid-*.png")) == ["grid-0000.png", "grid-0001.png"]
    first, second = (pixels(out / "samples" / f"0000{i}.png") for i in (0, 2))
    assert np.array_equal(first, second)
    assert not np.array_equal(first, pixels(out / "samples" / "00001.png"))  # another seed
    # a sample drawn alone with its own seed is the one drawn in the batch
    alone = tmp_path / "alone"
    assert run(scripts, ["--ckpt", text_run.ckpt, "--prompt", PROMPT, "--outdir", alone, *SMALL[:-6],
                         "--n_samples", "1", "--seed", "43", "--scale", "3.0", "--device", "cpu", "--skip_grid"]) == 0
    assert np.array_equal(pixels(alone / "samples" / "00000.png"), pixels(out / "samples" / "00001.png"))


def test_from_file_batches_prompts_and_n_iter_repeats(scripts, text_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a white background\n\na blue square on a black background\n"
                       "a green triangle on a gray background\n")
    out = tmp_path / "out"
    assert run(scripts, ["-r", text_run.logdir, "--from-file", prompts, "--outdir", out, *SMALL[:-6],
                         "--n_iter", "2", "--n_samples", "2", "--scale", "1.0", "--device", "cpu",
                         "--precision", "bf16", "--skip_grid"]) == 0
    files = sorted((out / "samples").iterdir())
    assert len(files) == 6 and not (out / "grid-0000.png").exists()
    captions = [text_chunks(f)["prompt"] for f in files]
    assert captions[:3] == [line for line in prompts.read_text().splitlines() if line] == captions[3:]
    assert [int(text_chunks(f)["seed"]) for f in files] == [42, 43, 44, 46, 47, 48]


def test_ema_flag_changes_the_samples(scripts, text_run, tmp_path):
    base = ["-r", text_run.logdir, "--prompt", PROMPT, *SMALL, "--skip_grid", "--n_samples", "1"]
    assert run(scripts, [*base, "--outdir", tmp_path / "raw"]) == 0
    assert run(scripts, [*base, "--outdir", tmp_path / "ema", "--ema"]) == 0
    raw, ema = (pixels(tmp_path / d / "samples" / "00000.png") for d in ("raw", "ema"))
    assert not np.array_equal(raw, ema)


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "{tmp}/missing.ckpt"], "--ckpt: checkpoint '{tmp}/missing.ckpt' does not exist"),
    (["-r", "{run}", "--H", "20"], "--H 20 must be a positive multiple of 8"),
    (["-r", "{run}", "--W", "12"], "--W 12 must be a positive multiple of 8"),
    (["-r", "{run}", "--f", "8"], "--f 8 differs from the model's first-stage downsampling factor 4"),
    (["-r", "{run}", "--from-file", "{tmp}/empty.txt"], "--from-file: prompt file '{tmp}/empty.txt' holds no prompt"),
    (["-r", "{run}", "--plms", "--ddim_eta", "0.5"], "PLMS is deterministic"),
    (["-r", "{run}", "--steps", "600"], "--steps 600"),
    (["-r", "{tmp}"], "is a directory but not a main.py run"),
], ids=["missing-ckpt", "H", "W", "f", "empty-prompts", "plms-eta", "steps", "not-a-run"])
def test_user_errors_are_one_line_exit_2_and_write_nothing(scripts, text_run, tmp_path, capsys, argv, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    out = tmp_path / "out"
    fill = {"tmp": tmp_path, "run": text_run.logdir}
    args = [a.format(**fill) for a in argv]
    base = ["--H", "16", "--W", "16", "--steps", "2", "--n_samples", "1", "--device", "cpu"]
    assert run(scripts, [*base, *args, "--outdir", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert message.format(**fill) in err
    assert not out.exists()


def test_command_line_prints_one_error_line_and_exits_2(tmp_path):
    script = Path(__file__).resolve().parents[2] / "scripts" / "txt2img.py"
    result = subprocess.run([sys.executable, str(script), "--ckpt", str(tmp_path / "none.ckpt"), "--outdir",
                             str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --ckpt: checkpoint '{tmp_path / 'none.ckpt'}' does not exist"
    assert not (tmp_path / "out").exists()


def test_a_conditioner_text_model_samples_with_its_trained_null(scripts, tiny_runs, tmp_path):
    """A GeneralConditioner text model goes through the same script; guidance's null is what its embedder was
    trained to drop to (zeros), not the empty caption."""
    import torch

    from ldm import inference as inf

    run_dir = tiny_runs("conditioner").logdir
    out = tmp_path / "out"
    assert run(scripts, ["-r", run_dir, "--prompt", PROMPT, "--outdir", out, *SMALL]) == 0
    assert len(list((out / "samples").glob("*.png"))) == 2
    model, _, _ = inf.load_from_args(scripts("txt2img").get_parser().parse_args(["-r", str(run_dir),
                                                                                 "--device", "cpu"]))
    assert inf.is_text_model(model)
    c, uc = inf.text_conditioning(model, [PROMPT, "a blue square on a black background"], 3.0)
    assert set(c) == set(uc) == {"crossattn"} and c["crossattn"].shape[0] == 2
    assert c["crossattn"].abs().sum() > 0 and not uc["crossattn"].any()
    with torch.no_grad():
        torch.testing.assert_close(c["crossattn"], model.cond_stage_model.embedders[0]([PROMPT, "a blue square on a "
                                                                                         "black background"]))
