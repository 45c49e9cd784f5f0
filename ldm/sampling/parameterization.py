"""What a diffusion network predicts, converted to and from (x0, eps) in one place.

Every process writes x_t = alpha x0 + sigma eps (`ldm.sampling.schedule`), so each conversion is written once in
terms of (alpha, sigma) and serves VP, EDM and flow models alike:

- eps: the noise; x0: the clean sample;
- v: v = alpha eps - sigma x0 (Salimans & Ho 2022, "Progressive Distillation", sec. 4 and appendix D);
- flow: the velocity u = eps - x0 of x_t = (1 - t) x0 + t eps (Liu et al. 2022, "Flow Straight and Fast");
- edm: the preconditioned network F of Karras et al. 2022 (Table 1): D = c_skip x + c_out F(c_in x; c_noise),
  on the VE-normalised x = x_t / alpha at level s = sigma / alpha.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

PARAMETERIZATIONS = ("eps", "x0", "v", "flow", "edm")

Number = torch.Tensor | float


class Prediction(NamedTuple):
    """A denoiser's answer at one step: the predicted clean sample and the predicted noise."""

    x0: torch.Tensor
    eps: torch.Tensor


def check_parameterization(parameterization: str) -> str:
    """Return the name when it is one of PARAMETERIZATIONS, else raise naming the choices."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization '{parameterization}' unknown; expected one of {', '.join(PARAMETERIZATIONS)}")
    return parameterization


def edm_scalings(sigma: Number, sigma_data: float = 0.5) -> tuple[Number, Number, Number, Number]:
    """(c_skip, c_out, c_in, c_noise) of EDM preconditioning at VE level sigma (Karras et al. 2022, Table 1):
    sigma_data^2 / (sigma^2 + sigma_data^2), sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
    1 / sqrt(sigma^2 + sigma_data^2) and ln(sigma) / 4."""
    total = sigma**2 + sigma_data**2
    root = total**0.5
    log = torch.log(sigma) if isinstance(sigma, torch.Tensor) else math.log(sigma)
    return sigma_data**2 / total, sigma * sigma_data / root, 1 / root, log / 4


def input_scale(parameterization: str, alpha: Number, sigma: Number, sigma_data: float = 0.5) -> Number:
    """The factor the network input x_t is multiplied by: 1, except c_in / alpha for edm."""
    if parameterization != "edm":
        return 1.0
    return edm_scalings(sigma / alpha, sigma_data)[2] / alpha


def to_prediction(parameterization: str, output: torch.Tensor, x_t: torch.Tensor, alpha: Number, sigma: Number,
                  sigma_data: float = 0.5) -> Prediction:
    """(x0, eps) from a network output under the given parameterization; alpha and sigma broadcast over x_t."""
    if parameterization == "eps":
        return Prediction((x_t - sigma * output) / alpha, output)
    if parameterization == "x0":
        return Prediction(output, (x_t - alpha * output) / sigma)
    if parameterization == "v":
        norm = alpha**2 + sigma**2  # 1 for VP processes
        return Prediction((alpha * x_t - sigma * output) / norm, (sigma * x_t + alpha * output) / norm)
    if parameterization == "flow":
        total = alpha + sigma  # 1 for the flow process
        return Prediction((x_t - sigma * output) / total, (x_t + alpha * output) / total)
    if parameterization == "edm":
        s, x_ve = sigma / alpha, x_t / alpha
        c_skip, c_out, _, _ = edm_scalings(s, sigma_data)
        x0 = c_skip * x_ve + c_out * output
        return Prediction(x0, (x_ve - x0) / s)
    check_parameterization(parameterization)
    raise AssertionError("unreachable")


def to_x0(parameterization: str, output: torch.Tensor, x_t: torch.Tensor, alpha: Number, sigma: Number,
          sigma_data: float = 0.5) -> torch.Tensor:
    """The clean sample a network output predicts (see to_prediction)."""
    return to_prediction(parameterization, output, x_t, alpha, sigma, sigma_data).x0


def training_target(parameterization: str, x0: torch.Tensor, noise: torch.Tensor, alpha: Number, sigma: Number,
                    sigma_data: float = 0.5) -> torch.Tensor:
    """What the network is trained to output for clean x0 noised to x_t = alpha x0 + sigma noise."""
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return alpha * noise - sigma * x0
    if parameterization == "flow":
        return noise - x0
    if parameterization == "edm":
        s = sigma / alpha
        c_skip, c_out, _, _ = edm_scalings(s, sigma_data)
        return (x0 - c_skip * (x0 + s * noise)) / c_out
    check_parameterization(parameterization)
    raise AssertionError("unreachable")
