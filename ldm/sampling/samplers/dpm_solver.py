"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models")."""
from __future__ import annotations

import math

import torch

from ldm.sampling.samplers.base import (
    Denoise,
    NoiseSource,
    Sigmas,
    StepCallback,
    batch_sigma,
    euler_step,
    paste_known,
    report,
    setup,
    to_d,
)


def dpmpp_2m(
    denoise: Denoise,
    sigmas: Sigmas,
    x: torch.Tensor,
    *,
    lower_order_final: bool = True,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    mask: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M), Algorithm 2: multistep second order in the data (x0) prediction on the log-SNR
    lambda = -log(sigma), as k-diffusion's sample_dpmpp_2m.

    The first step is first order (DDIM), as is a step that ends on a clean sample (lambda infinite) or starts from
    pure noise; with `lower_order_final` (diffusers' default) the last step is first order too when there are
    fewer than 15 steps.
    """
    levels, noise = setup(sigmas, x, noise, mask, x0)
    steps = len(levels) - 1
    old_denoised, h_last = None, math.inf
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        x = paste_known(x, sigma, mask, x0, noise)
        denoised = denoise(x, batch_sigma(sigma, x))
        h = math.log(sigma / sigma_next) if sigma_next > 0 else math.inf
        last = i == steps - 1
        if old_denoised is None or sigma_next == 0 or math.isinf(sigma) or (last and lower_order_final and steps < 15):
            x = euler_step(x, to_d(x, sigma, denoised), denoised, sigma, sigma_next)
        else:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
        old_denoised, h_last = denoised, h
        report(callback, i, sigma, sigma_next, x, denoised)
    return x
