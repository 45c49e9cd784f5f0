"""Helpers of the task tests (layout, semantic, retrieval, depth, variations): the built-in shapes-*.yaml configs
shrunk, a few plain training steps, and a main.py-like run directory of a trained model."""
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[2]
NOW = "2024-01-01T00-00-00"
TRAIN_STEPS = 3


@dataclass
class TaskRun:
    """A main.py-like run directory of a trained tiny model."""

    name: str
    logdir: Path
    config: Path
    ckpt: Path


def shipped_task_config(name, **params):
    """configs/latent-diffusion/shapes-<name>.yaml with a narrower UNet (32 channels), first stage (32) and text or
    layout transformer (32 wide, 1 layer), model params overridden by `params`: trains in seconds, keeps the task."""
    config = OmegaConf.load(REPO / "configs" / "latent-diffusion" / f"shapes-{name}.yaml")
    p = config.model.params
    p.unet_config.params.update(model_channels=32, num_head_channels=16)
    p.first_stage_config.params.ddconfig.ch = 32
    cond = p.get("cond_stage_config")
    if isinstance(cond, DictConfig) and cond.target.endswith("BERTEmbedder"):
        cond.params.update(n_embed=32, n_layer=1)
        p.unet_config.params.context_dim = 32
    for key, value in params.items():
        OmegaConf.update(p, key, value, force_add=True)
    return config


def train_steps(model, dataset, steps=TRAIN_STEPS, batch_size=4, lr=1e-3):
    """A few AdamW steps of `model` on `dataset` with EMA updates (plain loop: no Trainer start-up)."""
    model.learning_rate = lr
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    losses = []
    for batch, _ in zip(DataLoader(dataset, batch_size=batch_size), range(steps)):
        loss, _ = model.shared_step(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if model.use_ema:
            model.model_ema(model.model)
        losses.append(float(loss.detach()))
    return losses


def save_run(root, name, config, model):
    """A main.py-like run directory holding `model` (its state dict in Lightning's checkpoint dict)."""
    logdir = Path(root) / f"{NOW}_{name}"
    (logdir / "configs").mkdir(parents=True)
    (logdir / "checkpoints").mkdir()
    project = logdir / "configs" / f"{NOW}-project.yaml"
    OmegaConf.save(config, project)
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    ckpt = logdir / "checkpoints" / "last.ckpt"
    torch.save({"epoch": 0, "global_step": TRAIN_STEPS, "pytorch-lightning_version": "2.6.0", "state_dict": state,
                "optimizer_states": [], "lr_schedulers": []}, ckpt)
    return TaskRun(name, logdir, project, ckpt)


def randomise_zero_convs(model):
    """Small random weights for the UNet's zero-initialised convs, so a few steps let every input matter."""
    for param in model.model.diffusion_model.parameters():
        if param.ndim > 1 and not param.any():
            torch.nn.init.normal_(param, std=0.02)


def build(config):
    """The model of `config`, seeded, built from the repository root (configs name the tokenizer relative to it),
    its zero-initialised convs randomised."""
    import pytest

    from ldm.util import instantiate_from_config

    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        model = instantiate_from_config(config.model)
    randomise_zero_convs(model)
    return model


def depth_run(root, **params):
    """shapes-depth2img.yaml (shrunk) trained a few steps on ShapesScenes' depth: (run, model in eval mode)."""
    from ldm.data.shapes import ShapesScenesTrain

    config = shipped_task_config("depth2img", scale_by_std=False, scale_factor=0.5, **params)
    model = build(config)
    train_steps(model, ShapesScenesTrain(size=16, length=12))
    return save_run(root, "depth", config, model), model.eval()


def unclip_run(root):
    """shapes-unclip.yaml (shrunk) trained a few steps on shapes: (run, model in eval mode)."""
    from ldm.data.shapes import ShapesTrain

    config = shipped_task_config("unclip", scale_by_std=False, scale_factor=0.5)
    model = build(config)
    train_steps(model, ShapesTrain(size=16, length=12))
    return save_run(root, "unclip", config, model), model.eval()


def map_run(root, name):
    """shapes-layout2img.yaml or shapes-semantic.yaml (shrunk) trained a few steps on ShapesScenes, its cond stage
    training with the UNet: (run, model in eval mode)."""
    from ldm.data.shapes import ShapesScenesTrain
    from ldm.util import instantiate_from_config

    torch.manual_seed(0)
    config = shipped_task_config(name, scale_by_std=False, scale_factor=0.5)
    model = instantiate_from_config(config.model)
    before = [p.detach().clone() for p in model.cond_stage_model.parameters()]
    losses = train_steps(model, ShapesScenesTrain(size=16, length=12))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.cond_stage_model.parameters()))
    return save_run(root, name, config, model), model.eval()


def sr_run(root):
    """shapes-sr.yaml (shrunk) trained a few steps on ShapesSR (4x4 -> 16x16): (run, model in eval mode)."""
    from ldm.data.shapes import ShapesSR

    config = shipped_task_config("sr", scale_by_std=False, scale_factor=0.5)
    model = build(config)
    losses = train_steps(model, ShapesSR(size=16, length=12))
    assert all(torch.isfinite(torch.tensor(losses)))
    return save_run(root, "sr", config, model), model.eval()


# the sampler flags of scripts/txt2img.py, as every task script takes them, and what they must reach
SAMPLER_FLAGS = ["--sampler", "euler_ancestral", "--schedule", "karras", "--eta", "0.5", "--guidance_rescale", "0.3"]


def spy_sampling(monkeypatch):
    """Record the sampler a script builds (name, options) and the eta / guidance_rescale its sampling runs with."""
    from ldm import inference as inf

    seen, make, sample = {"made": []}, inf.make_sampler, inf.sample_latents

    def make_sampler(name, model, **options):
        seen["made"].append((name, options))
        return make(name, model, **options)

    def sample_latents(*args, **kwargs):
        seen.update(eta=args[5], guidance_rescale=kwargs.get("guidance_rescale", 0.0))
        return sample(*args, **kwargs)

    monkeypatch.setattr(inf, "make_sampler", make_sampler)
    monkeypatch.setattr(inf, "sample_latents", sample_latents)
    return seen


def assert_sampler_flags_reached(seen, meta):
    """SAMPLER_FLAGS built that sampler with that spacing, sampled with that eta and rescale, and are in the PNG
    metadata (text chunks)."""
    assert seen["made"] and all(made == ("euler_ancestral", {"spacing": "karras"}) for made in seen["made"]), seen
    assert seen["eta"] == 0.5 and seen["guidance_rescale"] == 0.3
    assert (meta["sampler"], meta["schedule"], meta["eta"]) == ("euler_ancestral", "karras", "0.5")
