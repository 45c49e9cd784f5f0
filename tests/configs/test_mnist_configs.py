"""The miniature-experiment configs (MNIST autoencoders f = 2, 4, 8 and LDMs f = 1, 2, 4, 8): one UNet for every f,
latents of the promised sizes, and a few training steps of each through main.py."""
import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parents[2]
AUTOENCODERS = {f: f"configs/autoencoder/mnist-kl-f{f}.yaml" for f in (2, 4, 8)}
LDMS = {f: f"configs/latent-diffusion/mnist-ldm-f{f}.yaml" for f in (1, 2, 4, 8)}
LATENT_CHANNELS = {1: 3, 2: 2, 4: 4, 8: 8}


def load(path):
    return OmegaConf.load(REPO / path)


def test_every_ldm_has_the_same_unet_up_to_its_input_and_output_channels():
    layouts = {}
    for f, path in LDMS.items():
        with torch.device("meta"):
            unet = instantiate_from_config(load(path).model.params.unet_config)
        layouts[f] = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    io = {"input_blocks.0.0.weight", "out.2.weight", "out.2.bias"}
    reference = {k: v for k, v in layouts[1].items() if k not in io}
    for f, layout in layouts.items():
        assert {k: v for k, v in layout.items() if k not in io} == reference, f
        c = LATENT_CHANNELS[f]
        assert layout["input_blocks.0.0.weight"] == (64, c, 3, 3) and layout["out.2.weight"] == (c, 64, 3, 3)
    counts = {f: sum(torch.Size(s).numel() for s in layout.values()) for f, layout in layouts.items()}
    assert counts == {1: 6_599_747, 2: 6_598_594, 4: 6_600_900, 8: 6_605_512}  # the numbers the configs state


def test_autoencoders_give_the_latents_the_ldms_expect():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    for f, path in AUTOENCODERS.items():
        ae_cfg, ldm_cfg = load(path), load(LDMS[f])
        ae = instantiate_from_config(ae_cfg.model).eval()
        with torch.no_grad():
            z = ae.encode(x).sample()
            assert ae.decode(z).shape == x.shape
        side = 32 // f
        assert z.shape == (1, LATENT_CHANNELS[f], side, side)
        p = ldm_cfg.model.params
        assert (p.channels, p.image_size) == (LATENT_CHANNELS[f], side)
        assert p.first_stage_config.params.ddconfig == ae_cfg.model.params.ddconfig  # the LDM loads this autoencoder
    pixel = load(LDMS[1]).model.params
    assert pixel.first_stage_config.target == "ldm.models.autoencoder.IdentityFirstStage"


def test_class_conditioning_drops_labels_to_the_null_class():
    for path in LDMS.values():
        embedder = instantiate_from_config(load(path).model.params.cond_stage_config)
        assert embedder.n_classes == 11 and embedder.ucg_rate == 0.1  # digits 0-9, null class 10
        labels = {"class_label": torch.arange(10).repeat(200)}
        torch.manual_seed(0)
        dropped = (embedder.train()(labels) == embedder.embedding.weight[10]).all(-1).float().mean()
        assert 0.07 < float(dropped) < 0.13
        assert embedder.get_unconditional_conditioning(2)["class_label"].tolist() == [10, 10]


@pytest.fixture(scope="module")
def main_module():
    if "main" not in sys.modules:
        spec = importlib.util.spec_from_file_location("main", REPO / "main.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["main"] = module
        spec.loader.exec_module(module)
    return sys.modules["main"]


@pytest.mark.slow
@pytest.mark.parametrize("path", [*AUTOENCODERS.values(), *LDMS.values()])
def test_config_trains_two_steps_through_main(tmp_path, monkeypatch, main_module, path):
    monkeypatch.chdir(REPO)  # configs name repository paths
    logdir = tmp_path / "logs"
    status = main_module.main([
        "-b", path, "-t", "--no-test", "-l", str(logdir), "--max_steps", "2", "--limit_train_batches", "2",
        "--limit_val_batches", "1", "--val_check_interval", "1", "data.params.batch_size=2", "data.params.num_workers=0",
        "lightning.trainer.enable_progress_bar=false", "lightning.trainer.log_every_n_steps=1",
        "lightning.trainer.max_time=null"])
    assert status == 0
    (run,) = logdir.iterdir()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    with open(run / "csv" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    loss = "train/rec_loss" if "autoencoder" in path else "train/loss_simple_step"
    val = "val/rec_loss" if "autoencoder" in path else "val/loss_simple_ema"
    assert sum(1 for r in rows if r[loss]) == 2 and sum(1 for r in rows if r["time/train_seconds"]) == 2
    assert any(r[val] for r in rows)
