"""Samplers as pure functions of a denoiser, a noise schedule and an explicit list of timesteps.

Every sampler takes `denoise(x, t) -> Prediction` (t holds one integer training timestep per batch
element), the `NoiseSchedule` the model was trained with, the timesteps to visit (strictly
decreasing) and the starting latent, and returns the final latent. Nothing else about the model is
visible here: guidance, parameterization (eps / x0 / v) and x0 clipping live in the denoiser.

Shared keyword arguments:

- `noise`: where random draws come from (anything with `.randn(shape)`, e.g. `GlobalNoise` or the
  per-sample `SeededNoise`); default: torch's global generator on the latent's device.
- `mask`, `x0`: inpainting. Before each step's model evaluation at timestep t the known region
  (mask == 1) is replaced by `schedule.q_sample(x0, t, noise)`, as the original samplers do. The
  draws for it come from `noise` as well.
- `callback`: called after every step with a dict {"i": step index, "t": timestep, "x": the new
  latent, "x0": the denoised prediction of that step}; samplers return only the final latent, so
  intermediates are collected through it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from ldm.sampling.noise import GlobalNoise
from ldm.sampling.parameterization import Prediction
from ldm.sampling.schedule import NoiseSchedule

Denoise = Callable[[torch.Tensor, torch.Tensor], Prediction]
StepCallback = Callable[[dict[str, Any]], None]
Timesteps = Sequence[int] | np.ndarray | torch.Tensor


class NoiseSource(Protocol):
    """Anything that draws standard normal noise of a given shape (GlobalNoise, SeededNoise)."""

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor: ...


def linspace_timesteps(num_steps: int, num_train_timesteps: int) -> np.ndarray:
    """`num_steps` rounded, evenly spaced timesteps from T-1 down, the t=0 end left out.

    This is diffusers' "linspace" spacing (Lin et al. 2023, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Table 2), the default of its DPMSolverMultistepScheduler.
    """
    if not 1 <= num_steps < num_train_timesteps:
        raise ValueError(f"number of sampling steps must lie in [1, {num_train_timesteps - 1}], got {num_steps}")
    return np.linspace(0, num_train_timesteps - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)


def ddim_sigma(alpha_bar: float, alpha_bar_prev: float, eta: float) -> float:
    """sigma_t(eta) = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) (Song et al. 2021, eq. 16)."""
    return eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))


def ddim_step(pred: Prediction, alpha_bar_prev: Any, sigma: Any = 0.0, z: torch.Tensor | None = None) -> torch.Tensor:
    """x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z (Song et al. 2021, eq. 12)."""
    x = alpha_bar_prev**0.5 * pred.x0 + (1 - alpha_bar_prev - sigma**2) ** 0.5 * pred.eps
    return x if z is None else x + sigma * z


def adams_bashforth(e_t: torch.Tensor, history: Sequence[torch.Tensor]) -> torch.Tensor:
    """Linear multistep combination of eps with the last up to three eps, newest last (orders 1-4)."""
    if not history:
        return e_t
    if len(history) == 1:
        return (3 * e_t - history[-1]) / 2
    if len(history) == 2:
        return (23 * e_t - 16 * history[-1] + 5 * history[-2]) / 12
    return (55 * e_t - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


def plms_step(
    denoise: Denoise,
    x: torch.Tensor,
    t: int,
    t_next: int,
    alpha_bar: float,
    alpha_bar_prev: float,
    history: Sequence[torch.Tensor],
    x0_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One PLMS step from t; returns (x_prev, predicted x0, the raw eps to append to the history).

    Without history this is the pseudo improved Euler step (an extra evaluation at `t_next`),
    otherwise the Adams-Bashforth combination of orders 2-4 (Liu et al. 2022, PNDM).
    """
    e_t = denoise(x, _batch_t(t, x)).eps
    if history:
        e_prime = adams_bashforth(e_t, history)
    else:
        x_pseudo, _ = _eps_transfer(x, e_t, alpha_bar, alpha_bar_prev, x0_fn)
        e_prime = (e_t + denoise(x_pseudo, _batch_t(t_next, x)).eps) / 2
    x_prev, x0 = _eps_transfer(x, e_prime, alpha_bar, alpha_bar_prev, x0_fn)
    return x_prev, x0, e_t


def ddim(
    denoise: Denoise,
    schedule: NoiseSchedule,
    timesteps: Timesteps,
    x: torch.Tensor,
    *,
    eta: float = 0.0,
    final_alpha_bar: float | None = None,
    temperature: float = 1.0,
    noise_dropout: float = 0.0,
    noise: NoiseSource | None = None,
    mask: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"), eq. 12 with sigma of eq. 16.

    eta=0 is the deterministic sampler; eta=1 samples ancestrally from the DDPM posterior of the
    strided process. Step i goes from timesteps[i] to timesteps[i+1]; the last step goes to
    `final_alpha_bar` (default alpha_bar_0, the original's choice and diffusers'
    `set_alpha_to_one=False`). `temperature` scales and `noise_dropout` drops the injected noise.
    """
    steps, levels = _levels(schedule, timesteps, final_alpha_bar)
    noise = _setup(noise, x, mask, x0)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    for i, t in enumerate(steps):
        a_t, a_prev = levels[i], levels[i + 1]
        sigma = ddim_sigma(a_t, a_prev, eta)
        if sigma**2 > 1 - a_prev:
            raise ValueError(f"eta={eta} is too large: the noise at step {i} exceeds the step's variance")
        x, pred = _evaluate(denoise, x, t, schedule, mask, x0, noise)
        z = _draw(noise, x.shape, temperature, noise_dropout) if sigma > 0 else None
        x = ddim_step(pred, a_prev, sigma, z)
        _report(callback, i, t, x, pred.x0)
    return x


def plms(
    denoise: Denoise,
    schedule: NoiseSchedule,
    timesteps: Timesteps,
    x: torch.Tensor,
    *,
    final_alpha_bar: float | None = None,
    x0_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    noise: NoiseSource | None = None,
    mask: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Pseudo linear multistep sampling (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion
    Models on Manifolds", PLMS) in the form of the original LDM PLMSSampler.

    The first step is a pseudo improved Euler step (one extra model evaluation at the next
    timestep); later steps combine eps with Adams-Bashforth of order 2, 3 and 4. The history keeps
    the raw eps of each step (not the combined one) and the transfer is DDIM with eta=0.
    `x0_fn` post-processes the x0 implied by the combined eps (quantization, thresholding).
    """
    steps, levels = _levels(schedule, timesteps, final_alpha_bar)
    noise = _setup(noise, x, mask, x0)
    history: list[torch.Tensor] = []
    for i, t in enumerate(steps):
        x = _paste_known(x, t, schedule, mask, x0, noise)
        t_next = steps[min(i + 1, len(steps) - 1)]
        x, pred_x0, e_t = plms_step(denoise, x, t, t_next, levels[i], levels[i + 1], history, x0_fn)
        history = (history + [e_t])[-3:]
        _report(callback, i, t, x, pred_x0)
    return x


def ddpm_ancestral(
    denoise: Denoise,
    schedule: NoiseSchedule,
    x: torch.Tensor,
    *,
    timesteps: Timesteps | None = None,
    temperature: float = 1.0,
    noise_dropout: float = 0.0,
    noise: NoiseSource | None = None,
    mask: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Ancestral sampling of DDPM (Ho et al. 2020, Algorithm 2) with the posterior q(x_{t-1} | x_t, x0)
    of eqs. 6-7, evaluated at the predicted x0 (the schedule's v_posterior and log-variance clipping).

    `timesteps` (keyword, unlike the other samplers, since all T of them is the usual choice) must
    be consecutive (t, t-1, ...); None means all T of them. No noise is added at
    t=0, so a run down to t=0 ends on the posterior mean. For strided ancestral sampling use
    `ddim(..., eta=1)`.
    """
    if timesteps is None:
        timesteps = np.arange(schedule.num_timesteps)[::-1]
    steps, _ = _levels(schedule, timesteps, 1.0)
    if any(a - b != 1 for a, b in zip(steps, steps[1:])):
        raise ValueError("ddpm_ancestral needs consecutive timesteps t, t-1, ...; use ddim(eta=1) to skip timesteps")
    noise = _setup(noise, x, mask, x0)
    for i, t in enumerate(steps):
        x, pred = _evaluate(denoise, x, t, schedule, mask, x0, noise)
        mean, _, log_var = schedule.q_posterior(pred.x0, x, _batch_t(t, x))
        x = mean + (0.5 * log_var).exp() * _draw(noise, x.shape, temperature, noise_dropout) if t > 0 else mean
        _report(callback, i, t, x, pred.x0)
    return x


def dpmpp_2m(
    denoise: Denoise,
    schedule: NoiseSchedule,
    timesteps: Timesteps,
    x: torch.Tensor,
    *,
    final_alpha_bar: float = 1.0,
    lower_order_final: bool = True,
    noise: NoiseSource | None = None,
    mask: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): multistep second order in
    the data (x0) prediction, on the log-SNR lambda_t = log(alpha_t / sigma_t) of the discrete timesteps.

    The first step is first order (DDIM). The last step, to `final_alpha_bar` (default 1: a clean
    sample, diffusers' `final_sigmas_type="zero"`), is first order when `lower_order_final` and
    there are fewer than 15 steps, and always when it ends clean, where lambda is infinite and the
    second-order correction is undefined. With `linspace_timesteps` this follows diffusers'
    DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2).
    """
    steps, levels = _levels(schedule, timesteps, final_alpha_bar)
    noise = _setup(noise, x, mask, x0)
    prev_x0, prev_h = None, 0.0
    for i, t in enumerate(steps):
        x, pred = _evaluate(denoise, x, t, schedule, mask, x0, noise)
        alpha, sigma = math.sqrt(levels[i]), math.sqrt(1 - levels[i])
        alpha_next, sigma_next = math.sqrt(levels[i + 1]), math.sqrt(1 - levels[i + 1])
        exp_neg_h = (sigma_next * alpha) / (alpha_next * sigma)  # e^{-h}, h = lambda_next - lambda
        h = -math.log(exp_neg_h) if exp_neg_h > 0 else math.inf
        last = i == len(steps) - 1
        if prev_x0 is None or (last and (sigma_next == 0 or (lower_order_final and len(steps) < 15))):
            d = pred.x0
        else:
            d = pred.x0 + (h / (2 * prev_h)) * (pred.x0 - prev_x0)  # (1 + 1/2r) D_i - 1/2r D_{i-1}, r = h_prev/h
        x = (sigma_next / sigma) * x - alpha_next * (exp_neg_h - 1) * d
        prev_x0, prev_h = pred.x0, h
        _report(callback, i, t, x, pred.x0)
    return x


def ddim_inversion(
    denoise: Denoise,
    schedule: NoiseSchedule,
    timesteps: Timesteps,
    x: torch.Tensor,
    *,
    initial_alpha_bar: float | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Deterministic DDIM run backwards, x0 -> x_t (Song et al. 2021, sec. 4.3, eq. 12 with eta=0 reversed).

    `timesteps` increase; x starts at `initial_alpha_bar` (default alpha_bar_0) and step i moves it
    to timesteps[i], evaluating the model there, so that `ddim` over the reversed timesteps (which
    evaluates at the same timestep for the same pair of levels) undoes it.
    """
    ascending = _int_list(timesteps)
    if any(a >= b for a, b in zip(ascending, ascending[1:])):
        raise ValueError(f"ddim_inversion needs strictly increasing timesteps, got {ascending}")
    steps, levels = _levels(schedule, ascending[::-1], initial_alpha_bar)
    steps, levels = steps[::-1], levels[::-1]
    for i, t in enumerate(steps):
        a_cur, a_next = levels[i], levels[i + 1]
        eps = denoise(x, _batch_t(t, x)).eps
        x, pred_x0 = _eps_transfer(x, eps, a_cur, a_next)
        _report(callback, i, t, x, pred_x0)
    return x


# --- shared helpers ---------------------------------------------------------------------------


def _levels(schedule: NoiseSchedule, timesteps: Timesteps, final_alpha_bar: float | None) -> tuple[list[int], list[float]]:
    """Validated decreasing integer timesteps and their alpha_bar values, followed by the final level."""
    steps = _int_list(timesteps)
    if not steps:
        raise ValueError("timesteps is empty: a sampler needs at least one step")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"timesteps must be strictly decreasing, got {steps}")
    if steps[0] >= schedule.num_timesteps or steps[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {schedule.num_timesteps - 1}], got {steps[-1]}..{steps[0]}")
    final = float(schedule.alphas_cumprod[0]) if final_alpha_bar is None else float(final_alpha_bar)
    return steps, [float(schedule.alphas_cumprod[t]) for t in steps] + [final]


def _int_list(timesteps: Timesteps) -> list[int]:
    """Timesteps of any accepted container as a list of Python ints."""
    raw = timesteps.tolist() if isinstance(timesteps, (np.ndarray, torch.Tensor)) else list(timesteps)
    return [int(t) for t in raw]


def _setup(noise: NoiseSource | None, x: torch.Tensor, mask: torch.Tensor | None, x0: torch.Tensor | None) -> NoiseSource:
    """Check the inpainting arguments and return the noise source (global by default)."""
    if mask is not None and x0 is None:
        raise ValueError("inpainting with `mask` needs `x0`, the latent whose masked region (mask == 1) is kept")
    return GlobalNoise(x.device) if noise is None else noise


def _batch_t(t: int, x: torch.Tensor) -> torch.Tensor:
    """The integer timestep t repeated for every batch element of x."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


def _paste_known(
    x: torch.Tensor, t: int, schedule: NoiseSchedule,
    mask: torch.Tensor | None, x0: torch.Tensor | None, noise: NoiseSource,
) -> torch.Tensor:
    """Inpainting hook: replace the known region (mask == 1) by x0 noised to timestep t."""
    if mask is None:
        return x
    known = schedule.q_sample(x0.to(x.dtype), _batch_t(t, x), noise.randn(x.shape, x.dtype))
    return known * mask + (1 - mask) * x


def _evaluate(
    denoise: Denoise, x: torch.Tensor, t: int, schedule: NoiseSchedule,
    mask: torch.Tensor | None, x0: torch.Tensor | None, noise: NoiseSource,
) -> tuple[torch.Tensor, Prediction]:
    """The inpainting hook, then the denoiser at timestep t: returns (the x evaluated, its prediction)."""
    x = _paste_known(x, t, schedule, mask, x0, noise)
    return x, denoise(x, _batch_t(t, x))


def _draw(noise: NoiseSource, shape: Sequence[int], temperature: float, dropout: float) -> torch.Tensor:
    """Step noise times temperature; dropout masks come from the same source, keeping seeding batch-invariant."""
    z = noise.randn(shape) * temperature
    if dropout > 0:
        keep = torch.special.ndtr(noise.randn(shape)) >= dropout  # uniform from a normal draw
        z = z * keep / (1 - dropout)
    return z


def _eps_transfer(
    x: torch.Tensor, eps: torch.Tensor, alpha_bar: float, alpha_bar_next: float,
    x0_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM (eta=0) move of x from level alpha_bar to alpha_bar_next along eps; returns (x_next, x0)."""
    x0 = (x - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)
    if x0_fn is not None:
        x0 = x0_fn(x0)
    return ddim_step(Prediction(x0, eps), alpha_bar_next), x0


def _report(callback: StepCallback | None, i: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
    """Hand one finished step to the callback."""
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "x0": x0})
