"""The discrete forward process q(x_t | x_0): betas and every quantity derived from them.

One object serves training (q_sample, loss targets, posterior) and sampling (alphas at the
sampler's timesteps), so no sampler re-derives the schedule.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from ldm.modules.diffusionmodules.util import make_beta_schedule


def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] reshaped to broadcast over a tensor with `ndim` dimensions."""
    out = values.to(t.device)[t]
    return out.reshape(t.shape[0], *((1,) * (ndim - 1)))


@dataclass(frozen=True)
class NoiseSchedule:
    """Betas of a discrete diffusion process and their derived quantities (Ho et al. 2020, eqs. 4, 6, 7).

    Everything is kept in float64 on the CPU; `buffers()` gives float32 tensors under the
    original DDPM buffer names.
    """

    betas: torch.Tensor
    v_posterior: float = 0.0
    alphas_cumprod: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def from_config(
        cls,
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        given_betas: Sequence[float] | np.ndarray | None = None,
        v_posterior: float = 0.0,
    ) -> "NoiseSchedule":
        """Build from the DDPM constructor's schedule parameters (given_betas wins when set)."""
        if given_betas is not None:
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start,
                                       linear_end=linear_end, cosine_s=cosine_s)
        return cls(torch.from_numpy(betas), v_posterior=v_posterior)

    @property
    def num_timesteps(self) -> int:
        """Number of discrete training timesteps T."""
        return len(self.betas)

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        """alpha_bar_{t-1}, with alpha_bar_{-1} = 1."""
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    @property
    def posterior_variance(self) -> torch.Tensor:
        """Variance of q(x_{t-1} | x_t, x_0), blended with beta_t by v_posterior (Ho et al. 2020, eq. 7)."""
        a, a_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        tilde_beta = self.betas * (1.0 - a_prev) / (1.0 - a)
        return (1 - self.v_posterior) * tilde_beta + self.v_posterior * self.betas

    def buffers(self) -> dict[str, torch.Tensor]:
        """float32 tensors under the buffer names of the original DDPM class (checkpoints hold them)."""
        return dict(self._buffers)

    @cached_property
    def _buffers(self) -> dict[str, torch.Tensor]:
        a, a_prev, betas = self.alphas_cumprod, self.alphas_cumprod_prev, self.betas
        post_var = self.posterior_variance
        values = {
            "betas": betas,
            "alphas_cumprod": a,
            "alphas_cumprod_prev": a_prev,
            "sqrt_alphas_cumprod": a.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - a).sqrt(),
            "log_one_minus_alphas_cumprod": (1.0 - a).log(),
            "sqrt_recip_alphas_cumprod": a.rsqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / a - 1).sqrt(),
            "posterior_variance": post_var,
            # the variance is 0 at t=0: clip before the log as the original LDM code does
            "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
            "posterior_mean_coef1": betas * a_prev.sqrt() / (1.0 - a),
            "posterior_mean_coef2": (1.0 - a_prev) * (1.0 - betas).sqrt() / (1.0 - a),
        }
        return {name: value.float() for name, value in values.items()}

    def alpha_bar(self, t: torch.Tensor, ndim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """alpha_bar_t for integer timesteps t, broadcastable over an `ndim`-dimensional batch."""
        return _gather(self.alphas_cumprod, t.long(), ndim).to(dtype)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (Ho et al. 2020, eq. 4)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        a = self.alpha_bar(t, x_start.ndim, torch.float64)
        out = a.sqrt().to(x_start.device) * x_start + (1 - a).sqrt().to(x_start.device) * noise
        return out.to(x_start.dtype)

    def q_posterior(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eqs. 6-7)."""
        buf = self._buffers
        dev, nd = x_t.device, x_t.ndim
        mean = (_gather(buf["posterior_mean_coef1"], t, nd).to(dev) * x_start
                + _gather(buf["posterior_mean_coef2"], t, nd).to(dev) * x_t)
        var = _gather(buf["posterior_variance"], t, nd).to(dev)
        log_var = _gather(buf["posterior_log_variance_clipped"], t, nd).to(dev)
        return mean, var, log_var
