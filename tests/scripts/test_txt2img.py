"""scripts/txt2img.py end to end on a tiny text-conditioned LDM (16x16 images, 4x4x4 latents), with the flags of SD v1
and v2 (--dpm_solver, --laion400m, --repeat, --torchscript, --ipex, --bf16) and SD v1's safety checker and invisible
watermark."""

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import acceleration
from ldm import inference as inf
from ldm.safety import WATERMARK_V1, Watermarker, read_watermark

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


# ----------------------------------------------------------------------------- the flags of SD v1 and v2
def samples_of(out):
    return [pixels(p) for p in sorted((out / "samples").iterdir())]


def sample(scripts, text_run, out, *flags):
    assert run(scripts, ["-r", text_run.logdir, "--prompt", PROMPT, "--outdir", out, *SMALL, *flags]) == 0
    return samples_of(out)


def error_line(capsys):
    """The one error line on stderr (progress bars of earlier runs aside)."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("Sampling")]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_dpm_solver_is_the_dpm_alias(scripts, text_run, tmp_path):
    alias = sample(scripts, text_run, tmp_path / "a", "--dpm_solver")
    dpm = sample(scripts, text_run, tmp_path / "b", "--dpm")
    assert all(np.array_equal(a, b) for a, b in zip(alias, dpm))
    assert text_chunks(tmp_path / "a" / "samples" / "00000.png")["sampler"] == "dpm"


def test_laion400m_reads_the_original_model_files(scripts, tmp_path, capsys):
    assert run(scripts, ["--laion400m", "--prompt", PROMPT, "--outdir", tmp_path, *SMALL]) == 2
    assert "models/ldm/text2img-large/model.ckpt" in error_line(capsys)  # not downloaded here
    parser = scripts("txt2img").get_parser()
    args = parser.parse_args(["--laion400m"])
    scripts("txt2img").resolve_flags(args, {"outdir": parser.get_default("outdir")})
    assert (args.config, args.ckpt, args.outdir) == ("configs/latent-diffusion/txt2img-1p4B-eval.yaml",
                                                     "models/ldm/text2img-large/model.ckpt",
                                                     "outputs/txt2img-samples-laion400m")
    assert run(scripts, ["--laion400m", "--ckpt", "x.ckpt", *SMALL]) == 2
    assert error_line(capsys) == "error: --laion400m picks its own config and checkpoint; drop --ckpt"


def test_repeat_repeats_each_prompt_of_the_file(scripts, text_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "out"
    argv = ["-r", text_run.logdir, "--from-file", prompts, "--outdir", out, *SMALL]
    assert run(scripts, [*argv, "--repeat", 2]) == 0
    names = sorted((out / "samples").iterdir())
    assert [text_chunks(p)["prompt"] for p in names] == ["a red circle", "a red circle", "a blue square",
                                                         "a blue square"]
    assert run(scripts, ["-r", text_run.logdir, "--prompt", PROMPT, "--repeat", 2, *SMALL]) == 2
    assert "--repeat repeats the prompts of --from-file" in error_line(capsys)


def test_torchscript_traces_unet_and_decoder_and_keeps_the_images(scripts, text_run, tmp_path, monkeypatch):
    plain = sample(scripts, text_run, tmp_path / "plain")
    traced = []
    trace = acceleration.trace
    monkeypatch.setattr(acceleration, "trace", lambda module, inputs: traced.append(type(module).__name__)
                        or trace(module, inputs))
    scripted = sample(scripts, text_run, tmp_path / "scripted", "--torchscript")
    assert traced == ["UNetModel", "Decoder"]
    for a, b in zip(plain, scripted):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_the_wrapper_calls_a_scripted_unet_with_positional_inputs(text_run):
    from ldm.inference import load_model

    _, model = load_model([str(text_run.config)], str(text_run.ckpt), torch.device("cpu"))
    c = model.get_learned_conditioning(["a red circle", "a blue square"])
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 500])
    expected = model.apply_model(x, t, c)
    acceleration.torchscript(model, (4, 4, 4), c)
    assert isinstance(model.model.scripted_diffusion_model, torch.jit.ScriptModule)
    torch.testing.assert_close(model.apply_model(x, t, c), expected, atol=1e-5, rtol=0)
    double = torch.cat([c, c])  # a guidance batch, twice the traced one
    torch.testing.assert_close(model.apply_model(torch.cat([x, x]), torch.cat([t, t]), double)[:2], expected,
                               atol=1e-5, rtol=0)


def test_ipex_needs_intel_extension(scripts, text_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "intel_extension_for_pytorch", None)  # not installed
    assert run(scripts, ["-r", text_run.logdir, "--prompt", PROMPT, "--outdir", tmp_path, *SMALL, "--ipex"]) == 2
    assert error_line(capsys) == ("error: --ipex needs Intel Extension for PyTorch (pip install "
                                  "intel-extension-for-pytorch), which is not installed")


def test_ipex_optimizes_text_encoder_unet_and_decoder(scripts, text_run, tmp_path, monkeypatch):
    """A recording stand-in for the package (it cannot be installed here) sees what SD 2's --ipex passes it."""
    calls = []
    stand_in = types.ModuleType("intel_extension_for_pytorch")
    stand_in.optimize = lambda module, **kw: calls.append((type(module).__name__, kw.get("dtype"))) or module
    monkeypatch.setitem(sys.modules, "intel_extension_for_pytorch", stand_in)
    sample(scripts, text_run, tmp_path / "a", "--ipex", "--bf16")
    assert calls == [("BERTEmbedder", None), ("UNetModel", torch.bfloat16), ("Decoder", torch.bfloat16)]


def test_bf16_is_bfloat16_autocast(scripts, text_run, tmp_path, capsys, monkeypatch):
    assert isinstance(acceleration.native_bf16(torch.device("cpu")), bool)  # the real probe answers
    seen = []
    autocast = inf.autocast
    monkeypatch.setattr(inf, "autocast", lambda precision, device: seen.append(precision) or autocast(precision, device))
    monkeypatch.setattr(acceleration, "native_bf16", lambda device: False)
    flag = sample(scripts, text_run, tmp_path / "a", "--bf16")
    assert "note: --bf16: this CPU has no native bfloat16 units" in capsys.readouterr().err
    assert seen and set(seen) == {"bf16"}
    precision = sample(scripts, text_run, tmp_path / "b", "--precision", "bf16")
    assert all(np.array_equal(a, b) for a, b in zip(flag, precision))
    # the UNet's weights are kept in bf16 (autocast's copies): the same images as with the fp32 weights
    stored = []
    monkeypatch.setattr(inf, "store_for_autocast", lambda module, dtype: stored.append(dtype) or 0)
    fp32_weights = sample(scripts, text_run, tmp_path / "c", "--bf16")
    capsys.readouterr()
    assert stored == [torch.bfloat16]
    assert all(np.array_equal(a, b) for a, b in zip(flag, fp32_weights))
    assert run(scripts, ["-r", text_run.logdir, "--prompt", PROMPT, *SMALL, "--bf16", "--precision", "full"]) == 2
    assert error_line(capsys) == "error: --bf16 and --precision full exclude each other"


def tiny_safety_checker(folder, flag_everything):
    """A randomly initialised StableDiffusionSafetyChecker whose thresholds flag every image or none, saved as the
    published folder is (model + CLIPFeatureExtractor preprocessor config)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=100, eos_token_id=2),
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        for weights in (checker.concept_embeds_weights, checker.special_care_embeds_weights):
            weights.fill_(-2.0 if flag_everything else 2.0)  # cosine similarities lie in [-1, 1]
    checker.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "CLIPFeatureExtractor", "crop_size": 32, "size": 32, "do_center_crop": True,
        "do_normalize": True, "do_resize": True, "resample": 3, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return folder


def test_safety_checker_blacks_out_flagged_images(scripts, text_run, tmp_path, capsys):
    plain = sample(scripts, text_run, tmp_path / "plain")
    passing = sample(scripts, text_run, tmp_path / "pass", "--safety_checker",
                     tiny_safety_checker(tmp_path / "lenient", False))
    assert all(np.array_equal(a, b) for a, b in zip(plain, passing))
    assert text_chunks(tmp_path / "pass" / "samples" / "00000.png")["nsfw_replaced"] == "False"
    flagged = sample(scripts, text_run, tmp_path / "flag", "--safety_checker",
                     tiny_safety_checker(tmp_path / "strict", True))
    assert all(not image.any() for image in flagged) and plain[0].any()
    assert text_chunks(tmp_path / "flag" / "samples" / "00001.png")["nsfw_replaced"] == "True"
    assert not pixels(tmp_path / "flag" / "grid-0000.png")[2:-2, 2:18].any()
    capsys.readouterr()
    assert run(scripts, ["-r", text_run.logdir, "--prompt", PROMPT, *SMALL, "--safety_checker", tmp_path / "no"]) == 2
    assert error_line(capsys).startswith(f"error: --safety_checker: '{tmp_path / 'no'}' is not a safety-checker folder")


def textured_image(size=256):
    """A smooth random RGB image (uint8, values 48..208), the kind of picture the DWT-DCT watermark is made for."""
    from scipy.ndimage import gaussian_filter

    base = gaussian_filter(np.random.default_rng(0).random((size, size, 3)), sigma=(2, 2, 0))
    return ((base - base.min()) / (base.max() - base.min()) * 160 + 48).astype(np.uint8)


def original_put_watermark(img, text):
    """SD v1's put_watermark: PIL image -> BGR (cv2) -> imwatermark dwtDct -> RGB."""
    import cv2
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", text.encode("utf-8"))
    bgr = cv2.cvtColor(np.array(img), cv2.COLOR_RGB2BGR)
    return np.asarray(Image.fromarray(encoder.encode(bgr, "dwtDct")[:, :, ::-1]))


def bit_agreement(found: bytes, text: str) -> float:
    return float((np.unpackbits(np.frombuffer(found, np.uint8)) ==
                  np.unpackbits(np.frombuffer(text.encode(), np.uint8))).mean())


def test_watermark_is_sd_v1s_put_watermark():
    image = textured_image()
    marked = Watermarker()(image)
    assert np.array_equal(marked, original_put_watermark(Image.fromarray(image), WATERMARK_V1))
    assert marked.dtype == np.uint8 and not np.array_equal(marked, image)
    assert np.abs(marked.astype(int) - image.astype(int)).mean() < 2  # invisible
    # imwatermark's dwtDct decodes most bits back (not all on a 256 x 256 image), an unmarked image about half
    assert bit_agreement(read_watermark(marked, len(WATERMARK_V1)), WATERMARK_V1) > 0.75
    assert bit_agreement(read_watermark(image, len(WATERMARK_V1)), WATERMARK_V1) < 0.6


def test_watermark_flag_marks_samples_and_grid(scripts, text_run, tmp_path, capsys, monkeypatch):
    assert run(scripts, ["-r", text_run.logdir, "--prompt", PROMPT, *SMALL, "--watermark"]) == 2
    assert error_line(capsys) == ("error: --watermark: images of 16x16 are too small for the invisible watermark "
                                  "(both sides must be at least 256 pixels)")
    marked = []
    monkeypatch.setattr(Watermarker, "check_size", lambda self, h, w: None)  # 16x16 samples: record, do not encode
    monkeypatch.setattr(Watermarker, "__call__", lambda self, image: marked.append((self.text, image.shape)) or image)
    sample(scripts, text_run, tmp_path / "a", "--watermark", "SDV2")
    assert marked == [("SDV2", (16, 16, 3))] * 2 + [("SDV2", (20, 38, 3))]  # both samples, then the grid
