"""Tiny building blocks for the task-model tests: a narrow KL first stage (f4), a small UNet, a model config around
them, a few-step CPU training loop (importable from the tests of this folder; its conftest puts it on the path)."""
import math

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

SIZE, LATENT = 32, 8  # images and latents (the first stage downsamples by 4)


def first_stage():
    ddconfig = dict(double_z=True, z_channels=4, resolution=SIZE, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 1],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    return {"target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {"embed_dim": 4, "ddconfig": ddconfig, "lossconfig": {"target": "torch.nn.Identity"}}}


def unet(in_channels, out_channels=4, context_dim=16, **extra):
    params = dict(image_size=LATENT, in_channels=in_channels, out_channels=out_channels, model_channels=32,
                  attention_resolutions=[2], num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16)
    if context_dim is not None:
        params.update(use_spatial_transformer=True, context_dim=context_dim)
    params.update(extra)
    return {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": params}


def model_config(target, unet_config, cond_stage, conditioning_key, cond_key="caption", **extra):
    params = dict(linear_start=0.0015, linear_end=0.0195, timesteps=100, first_stage_key="image",
                  cond_stage_key=cond_key, image_size=LATENT, channels=4, monitor=None, log_every_t=25,
                  conditioning_key=conditioning_key, scale_factor=1.0, unet_config=unet_config,
                  first_stage_config=first_stage(), cond_stage_config=cond_stage)
    params.update(extra)
    return OmegaConf.create({"target": target, "params": params})


def loader(dataset, batch_size=4):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


def train(model, dataset, steps=6, lr=1e-3, batch_size=4):
    """Fit for `steps` steps on CPU; returns the training losses."""
    model.learning_rate = lr
    losses = []

    class Track(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Track()])
    trainer.fit(model, loader(dataset, batch_size))
    assert len(losses) == steps and all(math.isfinite(v) for v in losses), losses
    return losses


def batch_of(dataset, n=2):
    return next(iter(loader(dataset, n)))


def randomise_zero_convs(model):
    """The UNet's zero-initialised convs would stop the first step's gradient from reaching the inputs and the label
    embedding: give them small random weights."""
    for param in model.model.diffusion_model.parameters():
        if param.ndim > 1 and not param.any():
            torch.nn.init.normal_(param, std=0.02)
