"""Conversions between what a diffusion model predicts (eps, x0 or v) and x0 / eps, in one place.

With a_t = sqrt(alpha_bar_t) and s_t = sqrt(1 - alpha_bar_t), x_t = a_t x_0 + s_t eps and
v = a_t eps - s_t x_0 (Salimans & Ho 2022, "Progressive Distillation", sec. 4 and appendix D).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

PARAMETERIZATIONS = ("eps", "x0", "v")


class Prediction(NamedTuple):
    """A denoiser's answer at one step: the predicted clean sample and the predicted noise."""

    x0: torch.Tensor
    eps: torch.Tensor


def check_parameterization(parameterization: str) -> str:
    """Return the name when it is one of eps / x0 / v, else raise naming the choices."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization '{parameterization}' unknown; expected one of {', '.join(PARAMETERIZATIONS)}")
    return parameterization


def to_prediction(parameterization: str, output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> Prediction:
    """(x0, eps) from a model output under the given parameterization; alpha_bar broadcasts over x_t."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if parameterization == "eps":
        return Prediction((x_t - s * output) / a, output)
    if parameterization == "x0":
        return Prediction(output, (x_t - a * output) / s)
    if parameterization == "v":
        return Prediction(a * x_t - s * output, s * x_t + a * output)
    check_parameterization(parameterization)
    raise AssertionError("unreachable")


def training_target(parameterization: str, x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """What the model is trained to output for clean x0 noised with `noise` at level alpha_bar."""
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    check_parameterization(parameterization)
    raise AssertionError("unreachable")


def from_prediction(parameterization: str, pred: Prediction, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The model output that would have produced `pred` (inverse of to_prediction)."""
    return training_target(parameterization, pred.x0, pred.eps, alpha_bar)
