"""DPM-Solver++ with noise (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"): single-step 2S ancestral and SDE, multistep 2M SDE and 3M SDE, as k-diffusion's
sample_dpmpp_2s_ancestral, sample_dpmpp_sde, sample_dpmpp_2m_sde and sample_dpmpp_3m_sde.

All step in t = -log(sigma) (half the log-SNR) with the data prediction D; h = t_next - t. Step noise comes
through `step_noise`, so a per-sample seeded source keeps sample i independent of its batch; `brownian=True`
(or a `BrownianTreeNoise` as `noise`) draws it from one Brownian tree per sample, k-diffusion's default for the
SDE samplers, which keeps the noise of a stretch of levels the same whatever the step count. A step from an
infinite level (pure noise) is the first-order limit of the step.
"""
from __future__ import annotations

import math

import torch

from ldm.sampling.noise import brownian_noise
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

SOLVER_TYPES = ("midpoint", "heun")


def t_of(sigma: float) -> float:
    """t = -log(sigma), +inf at sigma = 0."""
    return -math.log(sigma) if sigma > 0 else math.inf


def sigma_of(t: float) -> float:
    """sigma = exp(-t), the inverse of `t_of`."""
    return math.exp(-t)


def sde_noise(noise: NoiseSource, levels: list[float], x: torch.Tensor, brownian: bool) -> NoiseSource:
    """The sampler's noise source: a Brownian tree over its levels when asked for (or when given one)."""
    if brownian or hasattr(noise, "bind"):
        return brownian_noise(noise, levels, x.shape[0], x.device)
    return noise


def draw(noise: NoiseSource, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """The standard normal draw of a step; from an infinite level (where no Brownian increment exists) a plain one."""
    return noise.randn(x.shape, x.dtype) if math.isinf(sigma) else step_noise(noise, x, sigma, sigma_next)


def ancestral_euler(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float, eta: float,
                    s_noise: float, noise: NoiseSource) -> torch.Tensor:
    """An Euler step to sigma_down, then fresh noise of sigma_up (`ancestral_step`): the single-step samplers'
    step to 0 and their first-order limit from an infinite level."""
    down, up = ancestral_step(sigma, sigma_next, eta)
    x = euler_step(x, to_d(x, sigma, denoised), denoised, sigma, down)
    return x + draw(noise, x, sigma, sigma_next) * (s_noise * up) if sigma_next > 0 else x


def dpmpp_2s_ancestral(
    denoise: Denoise,
    sigmas: Sigmas,
    x: torch.Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    brownian: bool = False,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    mask: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022, Algorithm 1, singlestep second order with
    r = 1/2): each step moves to sigma_down through a midpoint evaluation in t, then adds fresh noise of sigma_up."""
    levels, noise = setup(sigmas, x, noise, mask, x0)
    noise = sde_noise(noise, levels, x, brownian)
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        x = paste_known(x, sigma, mask, x0, noise)
        denoised = denoise(x, batch_sigma(sigma, x))
        down, up = ancestral_step(sigma, sigma_next, eta)
        if down == 0 or math.isinf(sigma):
            x = ancestral_euler(x, denoised, sigma, sigma_next, eta, s_noise, noise)
        else:
            t, t_next = t_of(sigma), t_of(down)
            h = t_next - t
            sigma_mid = sigma_of(t + h / 2)
            x_2 = (sigma_mid / sigma) * x - math.expm1(-h / 2) * denoised
            denoised_2 = denoise(x_2, batch_sigma(sigma_mid, x))
            x = (down / sigma) * x - math.expm1(-h) * denoised_2
            if sigma_next > 0:
                x = x + draw(noise, x, sigma, sigma_next) * (s_noise * up)
        report(callback, i, sigma, sigma_next, x, denoised)
    return x


def dpmpp_sde(
    denoise: Denoise,
    sigmas: Sigmas,
    x: torch.Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    brownian: bool = False,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    mask: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """DPM-Solver++ (stochastic), k-diffusion's "DPM++ SDE": a singlestep second-order step with an intermediate
    level at fraction `r` of the step in t, each of its two parts an ancestral step (noise of `eta`); the data
    predictions combine as (1 - 1/2r) D + 1/2r D_r (Lu et al. 2022, eq. 9 with the ancestral split)."""
    if not 0 < r <= 1:
        raise ValueError(f"dpmpp_sde: r must lie in (0, 1], got {r}")
    levels, noise = setup(sigmas, x, noise, mask, x0)
    noise = sde_noise(noise, levels, x, brownian)
    fac = 1 / (2 * r)
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        x = paste_known(x, sigma, mask, x0, noise)
        denoised = denoise(x, batch_sigma(sigma, x))
        if sigma_next == 0 or math.isinf(sigma):
            x = ancestral_euler(x, denoised, sigma, sigma_next, eta, s_noise, noise)
        else:
            t, t_next = t_of(sigma), t_of(sigma_next)
            s = t + (t_next - t) * r
            sigma_t, sigma_s, sigma_t_next = sigma_of(t), sigma_of(s), sigma_of(t_next)
            # part 1: ancestral step to the intermediate level
            down, up = ancestral_step(sigma_t, sigma_s, eta)
            s_down = t_of(down)
            x_2 = (sigma_of(s_down) / sigma_t) * x - math.expm1(t - s_down) * denoised
            x_2 = x_2 + step_noise(noise, x, sigma_t, sigma_s) * (s_noise * up)
            denoised_2 = denoise(x_2, batch_sigma(sigma_s, x))
            # part 2: the whole step with the combined prediction
            down, up = ancestral_step(sigma_t, sigma_t_next, eta)
            t_down = t_of(down)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (sigma_of(t_down) / sigma_t) * x - math.expm1(t - t_down) * denoised_d
            x = x + step_noise(noise, x, sigma_t, sigma_t_next) * (s_noise * up)
        report(callback, i, sigma, sigma_next, x, denoised)
    return x


def sde_from_noise(x: torch.Tensor, denoised: torch.Tensor, sigma_next: float, eta: float, s_noise: float,
                   noise: NoiseSource) -> torch.Tensor:
    """The multistep SDE step from an infinite level, the limit h -> inf of the first-order step: D + sigma_next z
    with fresh noise z when eta > 0 (the start noise's weight exp(-eta h) vanishes), the start noise when eta = 0."""
    if not eta:
        return denoised + sigma_next * x
    return denoised + noise.randn(x.shape, x.dtype) * (sigma_next * s_noise)


def multistep_sde(denoise: Denoise, sigmas: Sigmas, x: torch.Tensor, order: int, eta: float, s_noise: float,
                  solver_type: str, lower_order_final: bool, brownian: bool, noise: NoiseSource | None,
                  callback: StepCallback | None, mask: torch.Tensor | None, x0: torch.Tensor | None) -> torch.Tensor:
    """DPM-Solver++(2M / 3M) on the SDE's exponent (1 + eta) h: the first-order step
    x' = exp(-(1 + eta) h) x + (1 - exp(-(1 + eta) h)) D, plus the multistep corrections of D's first
    (and second) differences, plus noise sigma_next sqrt(1 - exp(-2 eta h)) z: the exponential integrator of the
    reverse-time SDE in the data prediction (Lu et al. 2022, DPM-Solver++, its SDE variant; cf. Gonzalez et al.
    2023, "SEEDS"), with k-diffusion's eta interpolating between the ODE (0) and the SDE (1).

    Orders warm up from 1; `lower_order_final` caps them by the steps left when there are fewer than 15
    (diffusers' rule); the step to 0 returns D and a step from pure noise is `sde_from_noise`.
    """
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type '{solver_type}' unknown; expected one of {', '.join(SOLVER_TYPES)}")
    levels, noise = setup(sigmas, x, noise, mask, x0)
    noise = sde_noise(noise, levels, x, brownian)
    steps = len(levels) - 1
    history: list[tuple[torch.Tensor, float]] = []  # (D, h) of the latest finite steps, newest first
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        x = paste_known(x, sigma, mask, x0, noise)
        denoised = denoise(x, batch_sigma(sigma, x))
        h = t_of(sigma_next) - t_of(sigma)
        if sigma_next == 0:
            x = denoised
        elif math.isinf(sigma):
            x = sde_from_noise(x, denoised, sigma_next, eta, s_noise, noise)
        else:
            h_eta = h * (eta + 1)
            phi_1 = -math.expm1(-h_eta)  # 1 - exp(-(1 + eta) h)
            x = math.exp(-h_eta) * x + phi_1 * denoised
            step_order = min(order, len(history) + 1, steps - i if lower_order_final and steps < 15 else order)
            phi_2 = 1 - phi_1 / h_eta
            if step_order == 2:
                d_1, h_1 = history[0]
                weight = phi_2 if solver_type == "heun" else 0.5 * phi_1
                x = x + weight * (denoised - d_1) * (h / h_1)
            elif step_order == 3:
                (d_1, h_1), (d_2, h_2) = history[0], history[1]
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            if eta:
                x = x + step_noise(noise, x, sigma, sigma_next) * (sigma_next * math.sqrt(-math.expm1(-2 * eta * h))
                                                                   * s_noise)
        history = [] if math.isinf(sigma) else [(denoised, h), *history[:1]]
        report(callback, i, sigma, sigma_next, x, denoised)
    return x


def dpmpp_2m_sde(
    denoise: Denoise,
    sigmas: Sigmas,
    x: torch.Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    lower_order_final: bool = False,
    brownian: bool = False,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    mask: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE: the multistep second-order step of `multistep_sde`, its correction of D's slope the
    "midpoint" or the "heun" one. eta = 1 is the reverse-time SDE (diffusers' sde-dpmsolver++, solver_order=2),
    eta = 0 the ODE solver DPM-Solver++(2M)."""
    return multistep_sde(denoise, sigmas, x, 2, eta, s_noise, solver_type, lower_order_final, brownian, noise,
                         callback, mask, x0)


def dpmpp_3m_sde(
    denoise: Denoise,
    sigmas: Sigmas,
    x: torch.Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "heun",
    lower_order_final: bool = False,
    brownian: bool = False,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    mask: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: the multistep third-order step of `multistep_sde` (the first and second differences of
    D with phi_2 = 1 - (1 - e^-x) / x and phi_3 = phi_2 / x - 1/2 at x = (1 + eta) h), as k-diffusion's
    sample_dpmpp_3m_sde. `solver_type` is the correction of the second-order warm-up steps ("heun", k-diffusion's;
    "midpoint", what diffusers' sde-dpmsolver++ with solver_order=3 uses by default)."""
    return multistep_sde(denoise, sigmas, x, 3, eta, s_noise, solver_type, lower_order_final, brownian, noise,
                         callback, mask, x0)
