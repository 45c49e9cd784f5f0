"""Linear multistep (LMS) sampling on the noise levels, as k-diffusion's sample_lms: the classical Adams-Bashforth
construction (Lagrange interpolation of the last slopes, integrated over the step) on the irregular sigma grid."""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
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


@functools.lru_cache(maxsize=None)
def _gauss_legendre(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Nodes and weights of n-point Gauss-Legendre quadrature on [-1, 1]."""
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return tuple(nodes.tolist()), tuple(weights.tolist())


def lms_coefficient(points: Sequence[float], j: int, start: float, end: float) -> float:
    """The integral from start to end of the Lagrange basis polynomial of points[j] over `points`, exactly:
    the basis has degree len(points) - 1, which n-point Gauss-Legendre quadrature integrates without error for
    2n - 1 >= that degree (k-diffusion integrates the same polynomial numerically)."""
    points = [float(p) for p in points]
    nodes, weights = _gauss_legendre(max(1, (len(points) + 1) // 2))
    half, mid = 0.5 * (end - start), 0.5 * (end + start)
    total = 0.0
    for node, weight in zip(nodes, weights):
        x = mid + half * node
        value = 1.0
        for k, point in enumerate(points):
            if k != j:
                value *= (x - point) / (points[j] - point)
        total += weight * value
    return half * total


def lms(
    denoise: Denoise,
    sigmas: Sigmas,
    x: torch.Tensor,
    *,
    order: int = 4,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    mask: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """x' = x + sum_j c_j d_{i-j}: the slopes of the last `order` steps, integrated over [sigma_i, sigma_{i+1}]
    through the polynomial interpolating them in sigma. The order grows from 1 as history builds up; a step from
    pure noise is an Euler step and starts the history afresh (its level cannot enter a polynomial)."""
    if order < 1:
        raise ValueError(f"order must be at least 1, got {order}")
    levels, noise = setup(sigmas, x, noise, mask, x0)
    history: list[tuple[float, torch.Tensor]] = []
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        x = paste_known(x, sigma, mask, x0, noise)
        denoised = denoise(x, batch_sigma(sigma, x))
        d = to_d(x, sigma, denoised)
        if math.isinf(sigma):
            x = euler_step(x, d, denoised, sigma, sigma_next)
        else:
            history = (history + [(sigma, d)])[-order:]
            points = [level for level, _ in reversed(history)]  # newest first
            slopes = [slope for _, slope in reversed(history)]
            x = x + sum(lms_coefficient(points, j, sigma, sigma_next) * slope for j, slope in enumerate(slopes))
        report(callback, i, sigma, sigma_next, x, denoised)
    return x
