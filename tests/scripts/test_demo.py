"""The shapes demo (scripts/demo.py, `make demo`) and the shapes/Twemoji configs it ships with."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytorch_lightning as pl
import pytest
import torch
from omegaconf import OmegaConf

from ldm.models.autoencoder import AutoencoderKL
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import ema_state_dict, instantiate_from_config

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "scripts" / "demo.py"
SHAPES_AE, SHAPES_LDM = "configs/autoencoder/shapes-kl-f4.yaml", "configs/latent-diffusion/shapes-ldm-kl-4.yaml"
TWEMOJI_AE, TWEMOJI_LDM = "configs/autoencoder/twemoji-kl-f4.yaml", "configs/latent-diffusion/twemoji-ldm-kl-4.yaml"


def load_demo():
    spec = importlib.util.spec_from_file_location("shapes_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def at_repo_root(monkeypatch):
    """The configs name their tokenizers relative to the repository root, as main.py runs there."""
    monkeypatch.chdir(REPO)


def test_shapes_configs_instantiate_and_fit_together(at_repo_root):
    ae = instantiate_from_config(OmegaConf.load(SHAPES_AE).model)
    ldm = instantiate_from_config(OmegaConf.load(SHAPES_LDM).model)
    assert isinstance(ae, AutoencoderKL) and isinstance(ldm, LatentDiffusion)
    # the LDM's first stage is the autoencoder of stage 1 with its EMA weights (what prune_ckpt.py --ema writes):
    # they load without missing keys
    weights = {k: v for k, v in ema_state_dict(ae.state_dict(), "shapes-kl-f4").items() if not k.startswith("model_ema.")}
    missing, unexpected = ldm.first_stage_model.load_state_dict(weights, strict=False)
    assert not missing and unexpected and all(k.startswith("loss.") for k in unexpected)
    size = ldm.first_stage_model.encoder.resolution
    x = torch.zeros(2, 3, size, size)
    z = ldm.get_first_stage_encoding(ldm.encode_first_stage(x))
    assert z.shape == (2, ldm.channels, ldm.image_size, ldm.image_size)
    c = ldm.get_learned_conditioning(["a red circle on a white background", ""])
    assert ldm.apply_model(z, torch.tensor([1, 999]), c).shape == z.shape
    assert ldm.ucg_training["caption"]["p"] > 0


def test_max_time_and_missing_runs_are_named():
    demo = load_demo()
    assert demo.max_time(3.5) == "00:00:03:30"
    assert demo.max_time(90) == "00:01:30:00"
    assert len(demo.demo_captions(["white"])) == 21


def test_sampling_a_missing_run_fails_with_a_clear_message(tmp_path):
    result = subprocess.run([sys.executable, str(DEMO), "--ldm-logdir", str(tmp_path / "nope")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "--ldm-logdir" in result.stderr and "is not a directory" in result.stderr
    (tmp_path / "run" / "configs").mkdir(parents=True)
    result = subprocess.run([sys.executable, str(DEMO), "--ldm-logdir", str(tmp_path / "run")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "-project.yaml" in result.stderr


def _fit(config_path, steps, overrides=()):
    """Train a config's model on its own data for a few steps with a bare Lightning Trainer."""
    config = OmegaConf.merge(OmegaConf.load(config_path), OmegaConf.from_dotlist(list(overrides)))
    model = instantiate_from_config(config.model)
    model.learning_rate = 1e-4
    data = instantiate_from_config(config.data)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    assert trainer.global_step == steps
    return model


@pytest.mark.slow
def test_twemoji_configs_train_a_few_steps(at_repo_root, tmp_path):
    small = ["data.params.batch_size=2", "data.params.num_workers=0"]
    ae = _fit(TWEMOJI_AE, 2, small)
    path = tmp_path / "ae.ckpt"
    torch.save({"state_dict": ae.state_dict()}, path)
    ldm = _fit(TWEMOJI_LDM, 2, [*small, f"model.params.first_stage_config.params.ckpt_path={path}"])
    assert torch.equal(ldm.first_stage_model.decoder.conv_out.weight, ae.decoder.conv_out.weight)


@pytest.mark.slow
def test_demo_pipeline_trains_samples_and_scores(tmp_path):
    quick = ["lightning.trainer.max_steps=3", "data.params.batch_size=4", "data.params.num_workers=0",
             "lightning.trainer.limit_val_batches=1", "lightning.trainer.val_check_interval=3",
             "lightning.trainer.enable_progress_bar=false"]
    args = [sys.executable, str(DEMO), "--logdir", str(tmp_path / "logs"), "--outdir", str(tmp_path / "out"),
            "--seeds", "1", "--steps", "2", "--backgrounds", "white", "--psnr-images", "4"]
    for override in quick:
        args += ["--ae-override", override, "--ldm-override", override]
    result = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "caption adherence:" in result.stdout and "autoencoder PSNR" in result.stdout
    assert "time LDM training" in result.stdout
    out = tmp_path / "out"
    assert (out / "grid.png").is_file()
    assert len(list((out / "samples").glob("*.png"))) == 21
    scores = json.loads((out / "scores.json").read_text())
    assert 0.0 <= scores["adherence"] <= 1.0 and len(scores["samples"]) == 21
    assert set(scores["per_shape"]) == {"circle", "square", "triangle"}
    # the LDM run read the autoencoder of stage 1
    ldm_run = Path(scores["run"])
    project = OmegaConf.load(next((ldm_run / "configs").glob("*-project.yaml")))
    ae_ckpt = project.model.params.first_stage_config.params.ckpt_path
    assert Path(ae_ckpt).is_file() and "shapes-ae" in ae_ckpt
