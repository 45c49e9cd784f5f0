"""The sampler contract and the helpers every sampler shares.

Every sampler is a function

    fn(denoise, sigmas, x, *, noise=None, callback=None, mask=None, x0=None, **options) -> x

in the k-diffusion manner:

- `denoise(x, sigma) -> x0_hat` works on the VE-normalised latent x = x_t / alpha at level sigma (one float64
  level per batch element; see `ldm.sampling.denoiser.Denoiser`), so one sampler serves every process
  (discrete VP, EDM, flow) and every parameterization;
- `sigmas` is the explicit descending step array (`ldm.sampling.schedule.spacing`), ending at 0 for a clean sample;
- `x` is the start latent at sigmas[0], e.g. `schedule.to_ve(x_T, sigmas[0])` for pure noise x_T ~ N(0, I) in the
  process scale (k-diffusion starts from noise * sigmas[0] instead). When sigmas[0] is infinite (zero terminal SNR,
  flow at t = 1) x holds the pure noise itself (x_T in the process scale), and the first step is the first-order
  limit of the sampler's step, D + sigma_next * eps (+ fresh noise for the ancestral ones): higher orders do not
  exist there;
- `noise` is where random draws come from (`SeededNoise` per sample, `GlobalNoise`, ...; default: the global
  generator on x's device); `mask`, `x0` the inpainting hook: before each step's first model evaluation the
  known region (mask == 1) is replaced by x0 noised to the step's level (`paste_known`), as the original DDIM and
  PLMS samplers do; ancestral `ddpm` pastes after each step, as the original's LatentDiffusion.p_sample_loop;
- `callback` receives {"i", "sigma", "sigma_next", "x", "denoised"} after step i: the level the step started
  from, the level it reached, the latent there and the step's first x0 prediction.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from ldm.sampling.noise import GlobalNoise

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[dict[str, Any]], None]
Sigmas = torch.Tensor | Sequence[float]


class NoiseSource(Protocol):
    """Anything that draws standard normal noise of a given shape (GlobalNoise, SeededNoise)."""

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor: ...


def setup(sigmas: Sigmas, x: torch.Tensor, noise: NoiseSource | None, mask: torch.Tensor | None,
          x0: torch.Tensor | None) -> tuple[list[float], NoiseSource]:
    """Check the contract's arguments; return the levels as Python floats and the noise source."""
    levels = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    if len(levels) < 2:
        raise ValueError(f"sigmas must hold at least two levels (a start and an end), got {levels}")
    if any(s < 0 or math.isnan(s) for s in levels) or any(math.isinf(s) for s in levels[1:]):
        raise ValueError("sigmas must be non-negative and finite (only the first level may be inf)")
    if any(a <= b for a, b in zip(levels, levels[1:])):
        raise ValueError(f"sigmas must be strictly decreasing, got {levels[:4]}...{levels[-2:]}")
    if mask is not None and x0 is None:
        raise ValueError("inpainting with `mask` needs `x0`, the latent whose masked region (mask == 1) is kept")
    return levels, (GlobalNoise(x.device) if noise is None else noise)


def batch_sigma(sigma: float, x: torch.Tensor) -> torch.Tensor:
    """The level repeated for every batch element of x (float64, on the CPU: denoisers map it to model time)."""
    return torch.full((x.shape[0],), sigma, dtype=torch.float64)


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """The ODE derivative dx/dsigma = (x - D) / sigma, i.e. the implied noise (Karras et al. 2022, eq. 3);
    at an infinite level x holds the noise itself."""
    return x if math.isinf(sigma) else (x - denoised) / sigma


def euler_step(x: torch.Tensor, d: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """x + d (sigma_next - sigma): one Euler step of the probability-flow ODE (DDIM's update in VE form);
    from an infinite level its limit D + sigma_next d."""
    return denoised + d * sigma_next if math.isinf(sigma) else x + d * (sigma_next - sigma)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step: sigma_up = min(sigma_next, eta sigma_next sqrt(1 -
    sigma_next^2 / sigma^2)), sigma_down = sqrt(sigma_next^2 - sigma_up^2) (k-diffusion's get_ancestral_step;
    with eta = 1 the DDPM posterior, Song et al. 2021 eq. 16 in VE form)."""
    if not eta:
        return sigma_next, 0.0
    up = min(sigma_next, eta * sigma_next * math.sqrt(max(0.0, 1 - (sigma_next / sigma) ** 2)))
    return math.sqrt(max(0.0, sigma_next**2 - up**2)), up


def step_noise(noise: NoiseSource, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """The standard normal draw of a stochastic step from sigma to sigma_next: a source with
    `between(sigma, sigma_next, shape, dtype)` (e.g. a Brownian tree) is asked for it, any other draws randn."""
    between = getattr(noise, "between", None)
    if between is not None:
        return between(sigma, sigma_next, tuple(x.shape), x.dtype)
    return noise.randn(x.shape, x.dtype)


def draws_every_step(noise: NoiseSource) -> bool:
    """Whether the original LDM samplers (ddim, plms, ddpm) draw a step's noise at every step from this source and
    multiply it by zero where the step adds none, as the original code does (`GlobalNoise`: the global generator's
    stream stays the original's); per-sample seeded sources draw only what a step adds."""
    return bool(getattr(noise, "draws_every_step", False))


def tempered_noise(noise: NoiseSource, x: torch.Tensor, sigma: float, sigma_next: float, temperature: float,
                   dropout: float) -> torch.Tensor:
    """A step's noise times `temperature`, with `dropout` of it zeroed and the rest scaled by 1 / (1 - dropout) (the
    original DDIM/DDPM options: `torch.nn.functional.dropout(noise, p=noise_dropout)`); the mask comes from the same
    source (`noise.dropout`: F.dropout itself for the global generator, per-sample generators for SeededNoise)."""
    z = step_noise(noise, x, sigma, sigma_next) * temperature
    if dropout > 0:
        if not hasattr(noise, "dropout"):
            raise TypeError(f"noise_dropout needs a noise source with dropout(z, p); {type(noise).__name__} has none")
        z = noise.dropout(z, dropout)
    return z


def paste_known(x: torch.Tensor, sigma: float, mask: torch.Tensor | None, x0: torch.Tensor | None,
                noise: NoiseSource) -> torch.Tensor:
    """Inpainting hook: replace the known region (mask == 1) by x0 noised to level sigma, x0 + sigma z
    (z itself at an infinite level); the draw comes from the sampler's noise source."""
    if mask is None:
        return x
    z = noise.randn(x.shape, x.dtype)
    known = z if math.isinf(sigma) else x0.to(x.dtype) + sigma * z
    return known * mask + (1 - mask) * x


def report(callback: StepCallback | None, i: int, sigma: float, sigma_next: float, x: torch.Tensor,
           denoised: torch.Tensor) -> None:
    """Hand one finished step to the callback."""
    if callback is not None:
        callback({"i": i, "sigma": sigma, "sigma_next": sigma_next, "x": x, "denoised": denoised})
