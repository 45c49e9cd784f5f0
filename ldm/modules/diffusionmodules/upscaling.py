"""Low-resolution conditioning for latent upscalers: the image concatenated to the latent, optionally
noise-augmented (Ho et al. 2022, "Cascaded Diffusion Models", sec. 4.1: conditioning augmentation).

`ImageConcatWithNoiseAugmentation` noises the low-resolution image to a random (training) or given
(sampling) level of its own forward process and returns the level too, which the UNet receives as a
class label (`c_adm`). The schedule buffers keep the original names (`low_scale_model.betas`, ...).
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.openaimodel import Timestep
from ldm.sampling.schedule import NoiseSchedule
from ldm.util import ConfigError

_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
            "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod")


class AbstractLowScaleModel(nn.Module):
    """Prepares a low-resolution image for concatenation to the latent; passes it through unchanged."""

    def __init__(self, noise_schedule_config: Any = None):
        super().__init__()
        self.schedule: NoiseSchedule | None = None
        if noise_schedule_config is not None:
            self.register_schedule(**noise_schedule_config)

    def register_schedule(self, beta_schedule: str = "linear", timesteps: int = 1000, linear_start: float = 1e-4,
                          linear_end: float = 2e-2, cosine_s: float = 8e-3) -> None:
        """Build the augmentation's forward process and register its tensors under the original names."""
        self.schedule = NoiseSchedule.from_config(beta_schedule, int(timesteps), linear_start, linear_end, cosine_s)
        self.num_timesteps = self.schedule.num_timesteps
        self.linear_start, self.linear_end = linear_start, linear_end
        buffers = self.schedule.buffers()
        for name in _BUFFERS:
            self.register_buffer(name, buffers[name].clone())  # a copy: loading must not write into the schedule

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_start noised to levels t: sqrt(a_t) x + sqrt(1 - a_t) noise (Ho et al. 2020, eq. 4)."""
        if self.schedule is None:
            raise ValueError(f"{type(self).__name__} has no noise schedule: pass noise_schedule_config")
        return self.schedule.q_sample(x_start, t, noise)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x, no noise level)."""
        return x, None

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The image back from what forward returned (the identity here)."""
        return x


class SimpleImageConcat(AbstractLowScaleModel):
    """Concatenates the image as it is, at a constant noise level 0."""

    def __init__(self):
        super().__init__(noise_schedule_config=None)
        self.max_noise_level = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, zeros): no augmentation, level 0 for every sample."""
        return x, torch.zeros(x.shape[0], device=x.device, dtype=torch.long)


class ImageConcatWithNoiseAugmentation(AbstractLowScaleModel):
    """Noise-augments the low-resolution image to a level below `max_noise_level` and returns that level."""

    def __init__(self, noise_schedule_config: Any, max_noise_level: int = 1000, to_cuda: bool = False):
        super().__init__(noise_schedule_config=noise_schedule_config)
        if not 0 < int(max_noise_level) <= self.num_timesteps:
            raise ValueError(f"ImageConcatWithNoiseAugmentation: max_noise_level={max_noise_level} must lie in "
                             f"[1, {self.num_timesteps}] (the augmentation schedule's timesteps)")
        self.max_noise_level = int(max_noise_level)
        self.to_cuda = to_cuda  # kept for config compatibility: buffers follow the module's device

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x noised to `noise_level`, noise_level); levels are drawn uniformly in [0, max_noise_level) when not given."""
        if noise_level is None:
            noise_level = torch.randint(0, self.max_noise_level, (x.shape[0],), device=x.device).long()
        elif not isinstance(noise_level, torch.Tensor):
            raise TypeError(f"noise_level must be a tensor of integer levels, got {type(noise_level).__name__}")
        else:
            noise_level = noise_level.to(x.device).long()
            if noise_level.ndim == 0:
                noise_level = noise_level.expand(x.shape[0])
        return self.q_sample(x, noise_level, noise), noise_level


class CLIPEmbeddingNoiseAugmentation(ImageConcatWithNoiseAugmentation):
    """Noise augmentation of a CLIP embedding [B, D] at a random (or given) level; returns (the noised embedding,
    the level's sinusoidal embedding [B, timestep_dim]).

    `clip_stats_path`: a `torch.save`d (mean, std) pair of the embedding statistics (None: mean 0, std 1); the
    embedding is noised in standardised units, z = unscale(q_sample(scale(x), level)).
    """

    def __init__(self, *args: Any, clip_stats_path: str | os.PathLike[str] | None = None, timestep_dim: int = 256,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        if clip_stats_path is None:
            clip_mean, clip_std = torch.zeros(timestep_dim), torch.ones(timestep_dim)
        else:
            clip_mean, clip_std = _load_clip_stats(clip_stats_path)
        self.register_buffer("data_mean", clip_mean[None, :], persistent=False)
        self.register_buffer("data_std", clip_std[None, :], persistent=False)
        self.time_embed = Timestep(timestep_dim)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding standardised to zero mean and unit variance by the CLIP statistics."""
        return (x - self.data_mean) * 1.0 / self.data_std

    def unscale(self, x: torch.Tensor) -> torch.Tensor:
        """A standardised embedding back in the data statistics."""
        return x * self.data_std + self.data_mean

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x noised to `noise_level` in standardised units, the embedding of the level); levels are drawn
        uniformly in [0, max_noise_level) when not given."""
        if x.ndim != 2 or x.shape[1] != self.data_mean.shape[1]:
            raise ValueError(f"CLIPEmbeddingNoiseAugmentation: expects embeddings [B, {self.data_mean.shape[1]}] "
                             f"(the statistics' width), got {tuple(x.shape)}")
        z, noise_level = super().forward(self.scale(x), noise_level, noise)
        return self.unscale(z), self.time_embed(noise_level)


def _load_clip_stats(path: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (mean, std) pair saved at `path`, with one clear error when it is missing or not such a pair."""
    where = f"noise_aug_config.params.clip_stats_path '{os.fspath(path)}'"
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: no such file; expected a torch.save'd (mean, std) pair of CLIP embedding "
                          "statistics (SD 2.1 unCLIP-L: ViT-L-14_stats.th from the Karlo checkpoints)")
    stats = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(stats, (tuple, list)) and len(stats) == 2 and all(isinstance(s, torch.Tensor) and s.ndim == 1
                                                                          for s in stats)):
        raise ConfigError(f"{where}: expected a (mean, std) pair of 1-D tensors, got {type(stats).__name__}")
    return stats[0].float(), stats[1].float()
