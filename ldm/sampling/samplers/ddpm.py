"""Ancestral DDPM sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models") on the sampler contract."""
from __future__ import annotations

import math

import torch

from ldm.sampling.samplers.base import (
    Denoise,
    NoiseSource,
    Sigmas,
    StepCallback,
    batch_sigma,
    paste_known,
    report,
    setup,
    to_d,
)
from ldm.sampling.samplers.ddim import tempered_noise


def ddpm(
    denoise: Denoise,
    sigmas: Sigmas,
    x: torch.Tensor,
    *,
    v_posterior: float = 0.0,
    temperature: float = 1.0,
    noise_dropout: float = 0.0,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    mask: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """Algorithm 2 with the posterior q(x_{t-1} | x_t, x0) of eqs. 6-7 at the predicted x0, between the given levels.

    In VE form the posterior mean is D + (sigma'^2 / sigma^2)(x - D) and its variance
    (1 - v) sigma'^2 (1 - sigma'^2 / sigma^2) + v beta (beta = 1 - alpha_bar_t / alpha_bar_{t-1} of the variance-
    preserving process, blended in by the original's `v_posterior`). Consecutive training timesteps give the
    original sampler; any subset gives diffusers' DDPMScheduler with fewer steps. No noise is added on the step to 0.
    """
    levels, noise = setup(sigmas, x, noise, mask, x0)
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        x = paste_known(x, sigma, mask, x0, noise)
        denoised = denoise(x, batch_sigma(sigma, x))
        infinite = math.isinf(sigma)
        ratio = 0.0 if infinite else (sigma_next / sigma) ** 2
        x = denoised if infinite else denoised + (sigma_next**2 / sigma) * to_d(x, sigma, denoised)
        if sigma_next > 0:
            one_minus_alpha_bar = 1.0 if infinite else sigma**2 / (1 + sigma**2)
            beta = (1 - ratio) * (1 + sigma_next**2) * one_minus_alpha_bar
            variance = (1 - v_posterior) * sigma_next**2 * (1 - ratio) + v_posterior * beta
            x = x + math.sqrt(variance) * tempered_noise(noise, x, sigma, sigma_next, temperature, noise_dropout)
        report(callback, i, sigma, sigma_next, x, denoised)
    return x
