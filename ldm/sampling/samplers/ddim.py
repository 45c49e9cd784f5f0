"""DDIM and its inversion (Song et al. 2021, "Denoising Diffusion Implicit Models") on the sampler contract."""
from __future__ import annotations

import math

import torch

from ldm.sampling.samplers.base import (
    Denoise,
    NoiseSource,
    Sigmas,
    StepCallback,
    batch_sigma,
    draws_every_step,
    paste_known,
    report,
    setup,
    tempered_noise,
    to_d,
)
from ldm.sampling.schedule import Schedule


def ddim(
    denoise: Denoise,
    sigmas: Sigmas,
    x: torch.Tensor,
    *,
    eta: float = 0.0,
    temperature: float = 1.0,
    noise_dropout: float = 0.0,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    mask: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM, eq. 12 with sigma_t(eta) of eq. 16, in VE form: x' = D + sigma_down eps + sigma_up z with
    sigma_up = eta sigma' sqrt(1 - sigma'^2 / sigma^2) and sigma_down = sqrt(sigma'^2 - sigma_up^2).

    eta=0 is the deterministic sampler (the Euler step of the probability-flow ODE); eta=1 samples ancestrally
    from the DDPM posterior of the strided process. `temperature` scales and `noise_dropout` drops the noise.
    The original's last level is alpha_bar_0 (`spacing(..., final="min")`). From `GlobalNoise` every step draws its
    noise (times 0 where sigma_up = 0), so the global generator's stream is the original's.
    """
    levels, noise = setup(sigmas, x, noise, mask, x0)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        up = eta * sigma_next * math.sqrt(1 - (sigma_next / sigma) ** 2)
        if up > sigma_next * (1 + 1e-9):
            raise ValueError(f"eta={eta} is too large: the noise at step {i} exceeds the step's variance")
        x = paste_known(x, sigma, mask, x0, noise)
        denoised = denoise(x, batch_sigma(sigma, x))
        down = math.sqrt(max(0.0, sigma_next**2 - up**2))
        x = denoised + down * to_d(x, sigma, denoised)
        if up > 0 or draws_every_step(noise):  # the original draws at eta = 0 too and multiplies by zero
            x = x + up * tempered_noise(noise, x, sigma, sigma_next, temperature, noise_dropout)
        report(callback, i, sigma, sigma_next, x, denoised)
    return x


def ddim_inversion(
    denoise: Denoise,
    sigmas: Sigmas,
    x: torch.Tensor,
    *,
    schedule: Schedule,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Deterministic DDIM run backwards, x0 -> noise (Song et al. 2021, sec. 4.3, eq. 12 with eta=0 reversed).

    `sigmas` increase; step i moves x from sigmas[i] to sigmas[i+1], reading eps from the model at the level it
    moves to, fed the current x_t (as diffusers' DDIMInverseScheduler does), so that `ddim` over the reversed levels
    -- which evaluates the same level for the same pair -- undoes it. It needs the schedule for that rescaling.
    """
    levels = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    if len(levels) < 2 or any(a >= b for a, b in zip(levels, levels[1:])) or not math.isfinite(levels[-1]):
        raise ValueError(f"ddim_inversion needs at least two strictly increasing finite levels, got {levels}")
    alphas = schedule.alpha_sigma(torch.tensor(levels, dtype=torch.float64))[0].tolist()
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        x_in = x * (alphas[i] / alphas[i + 1])  # the same x_t, read at the next level
        denoised = denoise(x_in, batch_sigma(sigma_next, x))
        eps = to_d(x_in, sigma_next, denoised)
        x = x + (sigma_next - sigma) * eps
        report(callback, i, sigma, sigma_next, x, x - sigma_next * eps)
    return x
