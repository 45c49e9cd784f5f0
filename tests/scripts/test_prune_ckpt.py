"""scripts/prune_ckpt.py: EMA or raw weights into a .safetensors file that load_model_from_config loads directly."""
import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from ldm.inference import REPO
from ldm.util import load_model_from_config

KEY = "model.diffusion_model.input_blocks.0.0.weight"


def test_ema_fp16_file_loads_as_the_ema_weights(scripts, text_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "pruned.safetensors"
    assert scripts("prune_ckpt").main([str(text_run.ckpt), "--ema", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "last.ckpt:" in printed and "pruned.safetensors:" in printed and "MiB" in printed
    assert out.stat().st_size < text_run.ckpt.stat().st_size
    weights = load_file(str(out))
    assert not any(k.startswith("model_ema.") for k in weights)
    assert {k for k in text_run.state_dict if not k.startswith("model_ema.")} == set(weights)
    assert weights[KEY].dtype == torch.float16
    shadow = text_run.state_dict["model_ema.diffusion_modelinput_blocks00weight"]
    assert torch.equal(weights[KEY], shadow.half()) and not torch.equal(shadow, text_run.state_dict[KEY])
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["global_step"] == "3" and handle.metadata()["weights"] == "ema"
    monkeypatch.chdir(REPO)  # the config names its tokenizer relative to the repository root
    model = load_model_from_config(str(text_run.config), str(out))
    assert torch.equal(model.state_dict()[KEY], shadow.half().float())


def test_raw_fp32_keeps_the_weights_exactly_and_samples_like_the_checkpoint(scripts, text_run, tmp_path):
    out = tmp_path / "raw.safetensors"
    assert scripts("prune_ckpt").main([str(text_run.ckpt), "--dtype", "fp32", "--out", str(out)]) == 0
    weights = load_file(str(out))
    assert all(torch.equal(weights[k], text_run.state_dict[k]) for k in weights)
    # txt2img with the pruned file (and the run's config) draws the images of the full checkpoint
    common = ["--prompt", "a red circle", "--H", "16", "--W", "16", "--steps", "4", "--n_samples", "1",
              "--n_iter", "1", "--device", "cpu", "--skip_grid"]
    assert scripts("txt2img").main([*common, "-r", str(text_run.logdir), "--outdir", str(tmp_path / "a")]) == 0
    assert scripts("txt2img").main([*common, "--config", str(text_run.config), "--ckpt", str(out),
                                    "--outdir", str(tmp_path / "b")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "samples" / "00000.png")) for d in ("a", "b"))
    assert np.array_equal(a, b)


def test_default_name_and_errors(scripts, text_run, tmp_path, capsys):
    raw = tmp_path / "raw.pt"
    torch.save({k: v for k, v in text_run.state_dict.items() if not k.startswith("model_ema.")}, raw)
    assert scripts("prune_ckpt").main([str(raw), "--dtype", "bf16"]) == 0
    assert load_file(str(tmp_path / "raw-bf16.safetensors"))[KEY].dtype == torch.bfloat16
    for argv, message in ((["--ema"], "holds no EMA weights"), (["--out", str(tmp_path / "x.ckpt")],
                                                                 "must end in .safetensors")):
        assert scripts("prune_ckpt").main([str(raw), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err
    assert not (tmp_path / "raw-ema-fp16.safetensors").exists() and not (tmp_path / "x.ckpt").exists()
    assert scripts("prune_ckpt").main([str(tmp_path / "none.ckpt")]) == 2
    assert "checkpoint '" in capsys.readouterr().err
