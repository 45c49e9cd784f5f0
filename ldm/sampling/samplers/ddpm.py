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
    draws_every_step,
    report,
    setup,
    tempered_noise,
    to_d,
)


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
    original sampler; any subset gives diffusers' DDPMScheduler with fewer steps. No noise is added on the step to 0
    (from `GlobalNoise` it is drawn and multiplied by zero, as the original's `nonzero_mask` does).

    With `mask` and `x0` the known region is pasted after each step, as the original LatentDiffusion.p_sample_loop
    does: x0 noised to the level the step started from (the original's `q_sample(x0, t)`), so the last step leaves
    it at alpha_bar_0 (`paste_known_after`).
    """
    levels, noise = setup(sigmas, x, noise, mask, x0)
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        denoised = denoise(x, batch_sigma(sigma, x))
        infinite = math.isinf(sigma)
        ratio = 0.0 if infinite else (sigma_next / sigma) ** 2
        x = denoised if infinite else denoised + (sigma_next**2 / sigma) * to_d(x, sigma, denoised)
        if sigma_next > 0 or draws_every_step(noise):
            one_minus_alpha_bar = 1.0 if infinite else sigma**2 / (1 + sigma**2)
            beta = (1 - ratio) * (1 + sigma_next**2) * one_minus_alpha_bar
            variance = (1 - v_posterior) * sigma_next**2 * (1 - ratio) + v_posterior * beta if sigma_next > 0 else 0.0
            x = x + math.sqrt(variance) * tempered_noise(noise, x, sigma, sigma_next, temperature, noise_dropout)
        x = paste_known_after(x, sigma, sigma_next, mask, x0, noise)
        report(callback, i, sigma, sigma_next, x, denoised)
    return x


def paste_known_after(x: torch.Tensor, sigma: float, sigma_next: float, mask: torch.Tensor | None,
                      x0: torch.Tensor | None, noise: NoiseSource) -> torch.Tensor:
    """The original ancestral sampler's inpainting hook, after the step from sigma to sigma_next: the known region
    (mask == 1) becomes x0 noised to the step's start level in the variance-preserving process, alpha x0 + sigma_p z
    (Ho et al. 2020, eq. 4), held in the VE scale of sigma_next (divided by alpha(sigma_next))."""
    if mask is None:
        return x
    z = noise.randn(x.shape, x.dtype)
    alpha, sigma_p = (0.0, 1.0) if math.isinf(sigma) else (1 / math.sqrt(1 + sigma**2), sigma / math.sqrt(1 + sigma**2))
    known = (alpha * x0.to(x.dtype) + sigma_p * z) * math.sqrt(1 + sigma_next**2)
    return known * mask + (1 - mask) * x
