"""PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds") on the sampler contract."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ldm.sampling.samplers.base import (
    Denoise,
    NoiseSource,
    Sigmas,
    StepCallback,
    batch_sigma,
    draws_every_step,
    euler_step,
    paste_known,
    report,
    setup,
    tempered_noise,
    to_d,
)


def adams_bashforth(e_t: torch.Tensor, history: Sequence[torch.Tensor]) -> torch.Tensor:
    """Linear multistep combination of eps with the last up to three eps, newest last (orders 1-4)."""
    if not history:
        return e_t
    if len(history) == 1:
        return (3 * e_t - history[-1]) / 2
    if len(history) == 2:
        return (23 * e_t - 16 * history[-1] + 5 * history[-2]) / 12
    return (55 * e_t - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


def plms_step(denoise: Denoise, x: torch.Tensor, sigma: float, sigma_next: float,
              history: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One PLMS step from sigma to sigma_next; returns (x_next, the step's x0 prediction, its eps for the history).

    Without history this is the pseudo improved Euler step (a second evaluation at sigma_next), otherwise the
    Adams-Bashforth combination of orders 2-4 of the eps history; the transfer is DDIM (eta=0). From an infinite
    level, or towards 0 without history, the step is first order.
    """
    denoised = denoise(x, batch_sigma(sigma, x))
    e_t = to_d(x, sigma, denoised)
    if math.isinf(sigma):
        e_prime = e_t
    elif history:
        e_prime = adams_bashforth(e_t, history)
    elif sigma_next > 0:
        x_pseudo = x + (sigma_next - sigma) * e_t
        e_prime = (e_t + to_d(x_pseudo, sigma_next, denoise(x_pseudo, batch_sigma(sigma_next, x)))) / 2
    else:
        e_prime = e_t
    return euler_step(x, e_prime, denoised, sigma, sigma_next), denoised, e_t


def plms(
    denoise: Denoise,
    sigmas: Sigmas,
    x: torch.Tensor,
    *,
    noise_dropout: float = 0.0,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    mask: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pseudo linear multistep sampling in the form of the original LDM PLMSSampler: the first step is a pseudo
    improved Euler step (one extra model evaluation), later steps combine eps with Adams-Bashforth of order 2, 3
    and 4; the history keeps the raw eps of each step (not the combined one). Deterministic.

    From `GlobalNoise` each step draws the noise the original draws and multiplies by its sigma_t = 0 (two draws
    on the first step, one later; each through `noise_dropout` when set), so the global generator's stream -- the
    inpainting noise of later steps, the next batch -- is the original's; the result does not depend on them.
    """
    levels, noise = setup(sigmas, x, noise, mask, x0)
    history: list[torch.Tensor] = []
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        x = paste_known(x, sigma, mask, x0, noise)
        first = not history
        x, denoised, e_t = plms_step(denoise, x, sigma, sigma_next, history)
        if draws_every_step(noise):
            for _ in range(2 if first else 1):
                x = x + 0.0 * tempered_noise(noise, x, sigma, sigma_next, 1.0, noise_dropout)
        history = (history + [e_t])[-3:]
        report(callback, i, sigma, sigma_next, x, denoised)
    return x
