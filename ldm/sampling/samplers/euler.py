"""The Euler family of Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models"):
Euler and Heun (Algorithm 2, with its churn), DPM2 (a DPM-Solver-2 style midpoint step) and their ancestral forms,
as k-diffusion's sample_euler, sample_euler_ancestral, sample_heun, sample_dpm_2 and sample_dpm_2_ancestral."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ldm.sampling.samplers.base import (
    Denoise,
    NoiseSource,
    Sigmas,
    StepCallback,
    ancestral_step,
    batch_sigma,
    euler_step,
    paste_known,
    report,
    setup,
    step_noise,
    to_d,
)


Correction = Callable[[Denoise, torch.Tensor, torch.Tensor, float, float], torch.Tensor]


def churn(x: torch.Tensor, sigma: float, steps: int, noise: NoiseSource, s_churn: float, s_tmin: float,
          s_tmax: float, s_noise: float) -> tuple[torch.Tensor, float]:
    """Karras et al. 2022, Algorithm 2, lines 4-6: raise the level to sigma_hat = (1 + gamma) sigma with
    gamma = min(s_churn / N, sqrt(2) - 1) inside [s_tmin, s_tmax] by adding noise; returns (x, sigma_hat)."""
    gamma = min(s_churn / steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax and math.isfinite(sigma) else 0.0
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (gamma + 1)
    return x + step_noise(noise, x, sigma, sigma_hat) * s_noise * math.sqrt(sigma_hat**2 - sigma**2), sigma_hat


def heun_step(denoise: Denoise, x: torch.Tensor, d: torch.Tensor, sigma: float, target: float) -> torch.Tensor:
    """Heun's step from sigma to target: the mean of the slope here and at the end of the Euler step."""
    dt = target - sigma
    x_2 = x + d * dt
    d_2 = to_d(x_2, target, denoise(x_2, batch_sigma(target, x)))
    return x + (d + d_2) / 2 * dt


def midpoint_step(denoise: Denoise, x: torch.Tensor, d: torch.Tensor, sigma: float, target: float) -> torch.Tensor:
    """DPM-Solver-2's step from sigma to target: the slope at the geometric midpoint, taken from an Euler half step."""
    sigma_mid = math.exp((math.log(sigma) + math.log(target)) / 2)
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, denoise(x_2, batch_sigma(sigma_mid, x)))
    return x + d_2 * (target - sigma)


def ode_sampler(denoise: Denoise, sigmas: Sigmas, x: torch.Tensor, correction: Correction | None, *, s_churn: float,
                s_tmin: float, s_tmax: float, s_noise: float, noise: NoiseSource | None,
                callback: StepCallback | None, mask: torch.Tensor | None, x0: torch.Tensor | None) -> torch.Tensor:
    """Algorithm 2 of Karras et al.: churn, the slope at sigma_hat, then an Euler step or `correction`'s
    higher-order step; the step to 0 (where the slope is undefined) and a step from pure noise are Euler steps."""
    levels, noise = setup(sigmas, x, noise, mask, x0)
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        x = paste_known(x, sigma, mask, x0, noise)
        x, sigma_hat = churn(x, sigma, len(levels) - 1, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(x, batch_sigma(sigma_hat, x))
        d = to_d(x, sigma_hat, denoised)
        if correction is None or sigma_next == 0 or math.isinf(sigma_hat):
            x = euler_step(x, d, denoised, sigma_hat, sigma_next)
        else:
            x = correction(denoise, x, d, sigma_hat, sigma_next)
        report(callback, i, sigma, sigma_next, x, denoised)
    return x


def ancestral_sampler(denoise: Denoise, sigmas: Sigmas, x: torch.Tensor, correction: Correction | None, *,
                      eta: float, s_noise: float, noise: NoiseSource | None, callback: StepCallback | None,
                      mask: torch.Tensor | None, x0: torch.Tensor | None) -> torch.Tensor:
    """Ancestral steps: a deterministic step (Euler, or `correction`'s) down to sigma_down, then fresh noise of
    sigma_up (`ancestral_step`: eta = 1 is the DDPM posterior, eta = 0 the deterministic sampler)."""
    levels, noise = setup(sigmas, x, noise, mask, x0)
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        x = paste_known(x, sigma, mask, x0, noise)
        denoised = denoise(x, batch_sigma(sigma, x))
        down, up = ancestral_step(sigma, sigma_next, eta)
        d = to_d(x, sigma, denoised)
        if correction is None or down == 0 or math.isinf(sigma):
            x = euler_step(x, d, denoised, sigma, down)
        else:
            x = correction(denoise, x, d, sigma, down)
        if sigma_next > 0:
            x = x + step_noise(noise, x, sigma, sigma_next) * s_noise * up
        report(callback, i, sigma, sigma_next, x, denoised)
    return x


def euler(denoise: Denoise, sigmas: Sigmas, x: torch.Tensor, *, s_churn: float = 0.0, s_tmin: float = 0.0,
          s_tmax: float = math.inf, s_noise: float = 1.0, noise: NoiseSource | None = None,
          callback: StepCallback | None = None, mask: torch.Tensor | None = None,
          x0: torch.Tensor | None = None) -> torch.Tensor:
    """Euler steps of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022,
    Algorithm 2 without its correction), with the optional churn."""
    return ode_sampler(denoise, sigmas, x, None, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
                       noise=noise, callback=callback, mask=mask, x0=x0)


def heun(denoise: Denoise, sigmas: Sigmas, x: torch.Tensor, *, s_churn: float = 0.0, s_tmin: float = 0.0,
         s_tmax: float = math.inf, s_noise: float = 1.0, noise: NoiseSource | None = None,
         callback: StepCallback | None = None, mask: torch.Tensor | None = None,
         x0: torch.Tensor | None = None) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 2), with the optional churn."""
    return ode_sampler(denoise, sigmas, x, heun_step, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                       s_noise=s_noise, noise=noise, callback=callback, mask=mask, x0=x0)


def dpm2(denoise: Denoise, sigmas: Sigmas, x: torch.Tensor, *, s_churn: float = 0.0, s_tmin: float = 0.0,
         s_tmax: float = math.inf, s_noise: float = 1.0, noise: NoiseSource | None = None,
         callback: StepCallback | None = None, mask: torch.Tensor | None = None,
         x0: torch.Tensor | None = None) -> torch.Tensor:
    """A second-order sampler in the manner of DPM-Solver-2 (Lu et al. 2022) inside Algorithm 2 of Karras et al.:
    the slope at the geometric mean of the two levels moves x the whole step."""
    return ode_sampler(denoise, sigmas, x, midpoint_step, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                       s_noise=s_noise, noise=noise, callback=callback, mask=mask, x0=x0)


def euler_ancestral(denoise: Denoise, sigmas: Sigmas, x: torch.Tensor, *, eta: float = 1.0, s_noise: float = 1.0,
                    noise: NoiseSource | None = None, callback: StepCallback | None = None,
                    mask: torch.Tensor | None = None, x0: torch.Tensor | None = None) -> torch.Tensor:
    """Ancestral sampling with Euler steps."""
    return ancestral_sampler(denoise, sigmas, x, None, eta=eta, s_noise=s_noise, noise=noise, callback=callback,
                             mask=mask, x0=x0)


def dpm2_ancestral(denoise: Denoise, sigmas: Sigmas, x: torch.Tensor, *, eta: float = 1.0, s_noise: float = 1.0,
                   noise: NoiseSource | None = None, callback: StepCallback | None = None,
                   mask: torch.Tensor | None = None, x0: torch.Tensor | None = None) -> torch.Tensor:
    """Ancestral sampling with DPM2 steps."""
    return ancestral_sampler(denoise, sigmas, x, midpoint_step, eta=eta, s_noise=s_noise, noise=noise,
                             callback=callback, mask=mask, x0=x0)
