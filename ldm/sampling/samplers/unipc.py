"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models"): the multistep predictor UniP-p with the corrector UniC-p on the data (x0) prediction, B(h) = h ("bh1")
or e^h - 1 ("bh2"), as diffusers' UniPCMultistepScheduler(predict_x0=True).

The corrector refines each new point with the model evaluation made there anyway, so a step costs one
evaluation. In the VE-normalised latent the predictor reads x_next = (sigma_next / sigma) x + (1 - e^-h) D
- B(h) sum_k rho_k D1_k with h = log(sigma / sigma_next) and D1_k = (D_k - D) / r_k the scaled differences to
earlier predictions (Zhao et al. 2023, Algorithm 2; the corrector, Algorithm 1, adds the new point's difference).
"""
from __future__ import annotations

import math
from collections.abc import Collection, Sequence

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

SOLVER_TYPES = ("bh1", "bh2")


def unipc_coefficients(h: float, ratios: Sequence[float], order: int, solver_type: str, corrector: bool
                       ) -> tuple[float, list[float]]:
    """(B(h), rhos) of a UniP (corrector=False) or UniC (True) step of `order` with step h in -log(sigma).

    With hh = -h (the data prediction) the phi recursion h phi_{k+1} = h phi_k / hh - 1/(k+1)! gives
    b_k = k! h phi_{k+1} / B(h) (Zhao et al. 2023, eq. 12); rho solves R rho = b with R_kj = r_j^(k-1) over the
    ratios r_j = (lambda_j - lambda) / h of the earlier points and 1 for the new one. UniP-2 and UniC-1 use
    rho = 1/2, as the paper's code does.
    """
    hh = -h
    b_h = hh if solver_type == "bh1" else math.expm1(hh)
    h_phi_k, factorial = math.expm1(hh) / hh - 1, 1
    rows, b = [], []
    for k in range(1, order + 1):
        rows.append([r ** (k - 1) for r in [*ratios, 1.0]])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    if corrector:
        return b_h, [0.5] if order == 1 else np.linalg.solve(np.array(rows), np.array(b)).tolist()
    if order == 1:
        return b_h, []
    return b_h, [0.5] if order == 2 else np.linalg.solve(np.array(rows)[:-1, :-1], np.array(b)[:-1]).tolist()


def unipc_update(x: torch.Tensor, sigma: float, sigma_next: float, denoised: torch.Tensor,
                 earlier: Sequence[tuple[float, torch.Tensor]], order: int, solver_type: str,
                 new: torch.Tensor | None = None) -> torch.Tensor:
    """One UniP step of x from sigma to sigma_next (new=None), or the UniC correction of the point reached, whose
    prediction is `new`; `earlier` holds (sigma_k, D_k) of the previous points, newest first, at least order - 1."""
    h = math.log(sigma / sigma_next)
    ratios = [math.log(sigma / s_k) / h for s_k, _ in earlier[:order - 1]]
    b_h, rhos = unipc_coefficients(h, ratios, order, solver_type, corrector=new is not None)
    x_next = (sigma_next / sigma) * x - math.expm1(-h) * denoised
    res = sum((rho * (d_k - denoised) / r for rho, r, (_, d_k) in zip(rhos, ratios, earlier)), torch.zeros_like(x))
    if new is not None:
        res = res + rhos[-1] * (new - denoised)
    return x_next - b_h * res if rhos else x_next


def unipc(
    denoise: Denoise,
    sigmas: Sigmas,
    x: torch.Tensor,
    *,
    order: int = 2,
    solver_type: str = "bh2",
    lower_order_final: bool = True,
    disable_corrector: Collection[int] = (),
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    mask: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """UniPC of `order` 1-3 (the predictor's; the corrector adds one) with B(h) of `solver_type` "bh1" / "bh2".

    The order warms up from 1; `lower_order_final` (diffusers' default) caps it by the steps left. The corrector
    runs at every step after the first except those listed in `disable_corrector` (diffusers' indices: the
    correction made at step i + 1 of the point step i reached). A step to 0 is x0 = D (the predictor's limit at
    order 1), a step from pure noise D + sigma_next x.
    """
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"unipc: solver_type '{solver_type}' unknown; expected one of {', '.join(SOLVER_TYPES)}")
    if order not in (1, 2, 3):
        raise ValueError(f"unipc: order must be 1, 2 or 3, got {order}")
    levels, noise = setup(sigmas, x, noise, mask, x0)
    steps = len(levels) - 1
    history: list[tuple[float, torch.Tensor]] = []  # (sigma, D) of finite points, newest first
    last_x, last_order = None, 0
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        x = paste_known(x, sigma, mask, x0, noise)
        denoised = denoise(x, batch_sigma(sigma, x))
        if last_x is not None and i - 1 not in disable_corrector:
            x = unipc_update(last_x, history[0][0], sigma, history[0][1], history[1:], last_order, solver_type,
                             new=denoised)
        this_order = min(order, steps - i if lower_order_final else order, len(history) + 1)
        if sigma_next == 0:
            x_next, this_order = denoised, 0
        elif math.isinf(sigma):
            x_next, this_order = euler_step(x, to_d(x, sigma, denoised), denoised, sigma, sigma_next), 0
        else:
            x_next = unipc_update(x, sigma, sigma_next, denoised, history, this_order, solver_type)
        history = [] if math.isinf(sigma) else [(sigma, denoised), *history[:2]]
        last_x, last_order = (x, this_order) if this_order else (None, 0)
        x = x_next
        report(callback, i, sigma, sigma_next, x, denoised)
    return x
