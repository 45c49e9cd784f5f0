"""EvaluationCallback inside main.py training: a tiny pixel-space DDPM run logs val/fid@8 (and KID, precision/recall
and the real-vs-real floor) to TensorBoard; the same run on 2 CPU processes (DDP, gloo) logs the same values; an
autoencoder logs rFID/PSNR/SSIM; a bad configuration is one line from main.py."""
import os
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm.evaluation.inception import resolve_inception_weights

REPO = Path(__file__).resolve().parents[2]
HELPERS = REPO / "tests" / "main"
sys.path.insert(0, str(REPO / "tests" / "reliability"))
import run_helpers  # noqa: E402

LAYER = "64"  # 8 samples: the small layer keeps the covariances small (FID@8 on 2048 features costs minutes on CPU)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "ldm_cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LDM_CACHE_DIR", str(root))
        patch.delenv("LDM_INCEPTION_WEIGHTS", raising=False)
        return resolve_inception_weights()


def unet(channels):
    return {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {"image_size": 8, "in_channels": channels, "out_channels": channels, "model_channels": 32,
                       "attention_resolutions": [], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 4}}


def config(evaluation, model=None, size=8):
    images = "main_run_helpers.TinyImages"
    model = model or {"base_learning_rate": 0.0,  # the weights stay the initial ones: runs are comparable
                      "target": "ldm.models.diffusion.ddpm.DDPM",
                      "params": {"timesteps": 20, "image_size": 8, "channels": 3, "monitor": "val/loss",
                                 "unet_config": unet(3)}}
    return {"model": model,
            "data": {"target": "main.DataModuleFromConfig",
                     "params": {"batch_size": 2, "num_workers": 0,
                                "train": {"target": images, "params": {"size": size, "length": 8}},
                                "validation": {"target": images, "params": {"size": size, "length": 8, "seed": 1}}}},
            "lightning": {"callbacks": {"image_logger": None,
                                        "evaluation": {"target": "ldm.training.callbacks.EvaluationCallback",
                                                       "params": evaluation}},
                          "trainer": {"log_every_n_steps": 1, "enable_model_summary": False,
                                      "num_sanity_val_steps": 0, "limit_val_batches": 0, "enable_progress_bar": False}}}


DIFFUSION = {"every_n_steps": 2, "n_samples": 8, "batch_size": 4, "sampler": "ddim", "steps": 4,
             "metrics": ["fid", "kid", "prc"], "feature_layer": LAYER}


def run_main(tmp_path, cfg, weights, *args):
    path = tmp_path / "run.yaml"
    OmegaConf.save(OmegaConf.create(cfg), path)
    env = {"PYTHONPATH": os.pathsep.join([str(HELPERS), str(REPO)]), "LDM_INCEPTION_WEIGHTS": weights.path}
    return run_helpers.run_main(tmp_path, "-b", path, "-t", "--no-test", *args, timeout=900, env=env)


def logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = (tmp_path / "logs").iterdir()
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, weights):
    tmp = tmp_path_factory.mktemp("one_process")
    proc = run_main(tmp, config(DIFFUSION), weights, "--max_steps", "2")
    assert proc.returncode == 0, proc.stdout[-4000:]
    return logged_scalars(tmp)


EXPECTED = [f"val/{name}_d{LAYER}@{n}" for name, n in
            (("fid", 8), ("kid", 8), ("precision", 8), ("recall", 8), ("fid_floor", 8), ("kid_floor", 8))]


@pytest.mark.slow
def test_a_main_py_run_logs_its_metrics_and_the_floor(one_process):
    for tag in EXPECTED:
        assert tag in one_process, sorted(one_process)
        (step, value), = one_process[tag]  # logged once, at step 2
        assert step == 2
    assert one_process[f"val/fid_d{LAYER}@8"][0][1] > 0.0
    # untrained samples are further from the held-out images than the training images are
    assert one_process[f"val/fid_d{LAYER}@8"][0][1] > one_process[f"val/fid_floor_d{LAYER}@8"][0][1]


@pytest.mark.slow
def test_two_ddp_processes_log_the_one_process_values(one_process, tmp_path, weights):
    proc = run_main(tmp_path, config(DIFFUSION), weights, "--max_steps", "2", "--accelerator", "cpu",
                    "--devices", "2", "--strategy", "ddp")
    assert proc.returncode == 0, proc.stdout[-4000:]
    two = logged_scalars(tmp_path)
    for tag in EXPECTED:
        assert two[tag][0][1] == pytest.approx(one_process[tag][0][1], rel=1e-9, abs=1e-12), tag


@pytest.mark.slow
def test_an_autoencoder_run_logs_first_stage_metrics(tmp_path, weights):
    autoencoder = {"base_learning_rate": 1e-4, "target": "ldm.models.autoencoder.AutoencoderKL",
                   "params": {"embed_dim": 4, "ema_decay": 0.9,
                              "lossconfig": {"target": "ldm.modules.losses.LPIPSWithDiscriminator",
                                             "params": {"disc_start": 1000, "disc_factor": 0.0, "disc_num_layers": 1,
                                                        "perceptual_weight": 0.0}},
                              "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3,
                                           "out_ch": 3, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                                           "attn_resolutions": [], "dropout": 0.0}}}
    evaluation = {"every_n_steps": 1, "n_samples": 8, "batch_size": 4, "feature_layer": LAYER}
    proc = run_main(tmp_path, config(evaluation, autoencoder, size=16), weights, "--max_steps", "2")
    assert proc.returncode == 0, proc.stdout[-4000:]
    scalars = logged_scalars(tmp_path)
    for tag in (f"val/rfid_d{LAYER}@8", "val/psnr@8", "val/ssim@8"):
        assert [step for step, _ in scalars[tag]] == [1, 2], sorted(scalars)
    assert all(value > 0 for _, value in scalars["val/psnr@8"])


@pytest.mark.slow
def test_an_unknown_sampler_is_one_line_from_main_py(tmp_path, weights):
    proc = run_main(tmp_path, config({**DIFFUSION, "sampler": "euler_magic"}), weights, "--max_steps", "1")
    assert proc.returncode == 2
    errors = [line for line in proc.stdout.splitlines() if line.startswith("main.py: error:")]
    assert len(errors) == 1 and "EvaluationCallback sampler: unknown sampler 'euler_magic'" in errors[0]
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


def test_metrics_that_do_not_fit_the_model_are_refused_before_training(weights, monkeypatch):
    from ldm.evaluation.common import EvaluationError
    from ldm.training.callbacks import EvaluationCallback
    from ldm.util import instantiate_from_config

    monkeypatch.setenv("LDM_INCEPTION_WEIGHTS", weights.path)
    model = instantiate_from_config(config(DIFFUSION)["model"])
    with pytest.raises(EvaluationError, match="EvaluationCallback metrics: psnr cannot be computed for generated"):
        EvaluationCallback(metrics=["psnr"], n_samples=8).setup(None, model, "fit")
    with pytest.raises(EvaluationError, match="EvaluationCallback sampler ddim: --steps 50 must|ddim_num_steps"):
        EvaluationCallback(steps=50, n_samples=8).setup(None, model, "fit")  # 20 training timesteps
    with pytest.raises(EvaluationError, match="n_samples must be at least 2"):
        EvaluationCallback(n_samples=1)
