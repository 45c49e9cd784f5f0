"""Low-resolution conditioning for latent upscalers: the image concatenated to the latent, optionally
noise-augmented (Ho et al. 2022, "Cascaded Diffusion Models", sec. 4.1: conditioning augmentation).

`ImageConcatWithNoiseAugmentation` noises the low-resolution image to a random (training) or given
(sampling) level of its own forward process and returns the level too, which the UNet receives as a
class label (`c_adm`). The schedule buffers keep the original names (`low_scale_model.betas`, ...).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ldm.sampling.schedule import NoiseSchedule

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
