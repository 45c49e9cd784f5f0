"""The diffusion training loss as small parts, in the manner of sgm's `StandardDiffusionLoss`.

A `DiffusionLoss` composes a timestep sampler (which noise levels are trained), a loss weighting
(how much each level counts), the training target of the model's parameterization
(`ldm.sampling.parameterization.training_target`), an l1 / l2 distance and the original LDM's
extras (learned log-variance, `l_simple_weight`, `original_elbo_weight` with the VLB weights).
Each part is a small class chosen by config (`target`/`params`), e.g. in a model's `loss_config`:

    loss_config:
      target: ldm.sampling.loss.DiffusionLoss
      params:
        sigma_sampler_config: {target: ldm.sampling.loss.LogitNormalTimesteps, params: {mean: 0.0, std: 1.0}}
        loss_weighting_config: {target: ldm.sampling.loss.MinSNRWeighting, params: {gamma: 5.0}}
        offset_noise_strength: 0.1

Without a loss_config the model uses `DiffusionLoss()` (uniform timesteps, unit weight, no offset
noise), which draws the same random numbers and computes the same floating-point operations as
the original `p_losses`, so existing training is bit-identical.

Weightings are defined, as in sgm, on the error of the denoised estimate x0_hat at the VE noise
level sigma = sigma(t) / alpha(t); the loss is computed on the parameterization's own target, so a
weighting is carried over by the factor d x0_hat / d output (e.g. sigma for eps-prediction).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.sampling.parameterization import to_prediction, training_target
from ldm.sampling.schedule import NoiseSchedule
from ldm.util import ConfigError, instantiate_from_config

LOSS_TYPES = ("l1", "l2")


def check_loss_type(loss_type: str) -> str:
    """Return the name when it is l1 or l2, else raise naming the choices."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type '{loss_type}' unknown; expected one of {', '.join(LOSS_TYPES)}")
    return loss_type


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str, mean: bool = False) -> torch.Tensor:
    """|target - pred| (l1) or (target - pred)^2 (l2), per element or averaged over everything when `mean`."""
    if loss_type == "l1":
        loss = (target - pred).abs()
        return loss.mean() if mean else loss
    if loss_type == "l2":
        return F.mse_loss(target, pred, reduction="mean" if mean else "none")
    check_loss_type(loss_type)
    raise AssertionError("unreachable")


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """A [B] tensor reshaped to broadcast over an `ndim`-dimensional batch."""
    return values.reshape(-1, *((1,) * (ndim - 1)))


def _rand(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None, normal: bool) -> torch.Tensor:
    """Standard normal or uniform [0, 1) draws; with a generator, drawn on the generator's device and moved."""
    draw = torch.randn if normal else torch.rand
    if generator is None:
        return draw(shape, device=device)
    return draw(shape, generator=generator, device=generator.device).to(device)


# ---------------------------------------------------------------------------------------------- timestep samplers
class TimestepSampler(ABC):
    """Draws one training time per batch element, in the schedule's own time (integer t for NoiseSchedule)."""

    @abstractmethod
    def __call__(self, batch_size: int, schedule: NoiseSchedule, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times for a batch of `batch_size`."""


def unit_to_timesteps(u: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Map u in [0, 1] (0 clean, 1 pure noise) onto the schedule's time: floor(u * T) for T discrete steps.

    This is how diffusers' SD3 training script turns a density on [0, 1] into discrete indices.
    """
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"no mapping from [0, 1] onto a {type(schedule).__name__}")
    steps = schedule.num_timesteps
    return (u * steps).long().clamp(0, steps - 1)


class UniformTimesteps(TimestepSampler):
    """t ~ U{0, ..., T-1}, drawn with the same `torch.randint` call as the original DDPM (Ho et al. 2020, Alg. 1)."""

    def __call__(self, batch_size: int, schedule: NoiseSchedule, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        if not isinstance(schedule, NoiseSchedule):
            return unit_to_timesteps(_rand((batch_size,), torch.device(device), generator, normal=False), schedule)
        if generator is None:
            return torch.randint(0, schedule.num_timesteps, (batch_size,), device=device).long()
        t = torch.randint(0, schedule.num_timesteps, (batch_size,), generator=generator, device=generator.device)
        return t.long().to(device)


class LogitNormalTimesteps(TimestepSampler):
    """t = sigmoid(m + s n), n ~ N(0, 1): the logit-normal density of Esser et al. 2024 (SD3), eq. 19."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        if std <= 0:
            raise ValueError(f"LogitNormalTimesteps: std must be > 0, got {std}")
        self.mean, self.std = float(mean), float(std)

    def unit(self, batch_size: int, device: torch.device | str = "cpu",
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Draws on (0, 1) from the logit-normal density."""
        return torch.sigmoid(self.mean + self.std * _rand((batch_size,), torch.device(device), generator, normal=True))

    def __call__(self, batch_size: int, schedule: NoiseSchedule, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return unit_to_timesteps(self.unit(batch_size, device, generator), schedule)


class ModeTimesteps(TimestepSampler):
    """t = f_mode(u; s) = 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1): Esser et al. 2024 (SD3), eq. 20.

    s > 0 puts more mass on the middle times, s < 0 on the ends; f_mode is a bijection of [0, 1] for
    -1 <= s <= 2 / (pi - 2). The default 1.29 is the value SD3's ablation (and diffusers) use.
    """

    def __init__(self, scale: float = 1.29):
        if not -1.0 <= scale <= 2.0 / (math.pi - 2.0):
            raise ValueError(f"ModeTimesteps: scale must lie in [-1, 2/(pi-2) = {2 / (math.pi - 2):.4f}], got {scale}")
        self.scale = float(scale)

    def f_mode(self, u: torch.Tensor) -> torch.Tensor:
        """SD3 eq. 20 applied to u."""
        return 1 - u - self.scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)

    def unit(self, batch_size: int, device: torch.device | str = "cpu",
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Draws on [0, 1] from the mode density."""
        return self.f_mode(_rand((batch_size,), torch.device(device), generator, normal=False))

    def __call__(self, batch_size: int, schedule: NoiseSchedule, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return unit_to_timesteps(self.unit(batch_size, device, generator), schedule)


# ---------------------------------------------------------------------------------------------- loss weightings
def x0_error_scale(parameterization: str, alpha_bar: torch.Tensor) -> torch.Tensor:
    """d x0_hat / d output at fixed x_t: an error e in the training target is an error scale * e in x0_hat.

    Read off the parameterization's own conversion (x0_hat is linear in the output): -sigma for
    eps, 1 for x0, -sqrt(1 - alpha_bar) for v.
    """
    one = torch.ones_like(alpha_bar)
    return to_prediction(parameterization, one, torch.zeros_like(alpha_bar), alpha_bar).x0


class LossWeighting(ABC):
    """A per-sample weight of the loss on the training target."""

    @abstractmethod
    def __call__(self, sigma: torch.Tensor, scale: torch.Tensor, loss_type: str = "l2") -> torch.Tensor | None:
        """The weight at VE noise levels sigma, given the x0 error scale of the parameterization (None: no weight)."""


class UnitWeighting(LossWeighting):
    """The plain loss on the training target (the original LDM objective, Ho et al. 2020's L_simple)."""

    def __call__(self, sigma: torch.Tensor, scale: torch.Tensor, loss_type: str = "l2") -> None:
        """No weight: the loss is left untouched (so the default path stays bit-identical)."""
        return None


class X0Weighting(LossWeighting):
    """A weighting defined, as in sgm, by the weight lambda(sigma) of the x0 error at VE noise level sigma."""

    @abstractmethod
    def x0_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma): the weight of d(x0_hat, x0) at noise level sigma (per sample)."""

    def __call__(self, sigma: torch.Tensor, scale: torch.Tensor, loss_type: str = "l2") -> torch.Tensor:
        """The weight of d(output, target): lambda(sigma) * |scale|^p, p = 2 for l2 and 1 for l1."""
        power = 2 if loss_type == "l2" else 1
        return self.x0_weight(sigma) * scale.abs() ** power


class MinSNRWeighting(X0Weighting):
    """min(SNR, gamma) on the x0 error (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy", eq. 8), SNR = alpha^2 / sigma^2 = 1 / sigma_VE^2.

    On the eps target this is min(SNR, gamma) / SNR, on the v target min(SNR, gamma) / (SNR + 1),
    the weights of diffusers' text-to-image training script.
    """

    def __init__(self, gamma: float = 5.0):
        if gamma <= 0:
            raise ValueError(f"MinSNRWeighting: gamma must be > 0, got {gamma}")
        self.gamma = float(gamma)

    def x0_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.clamp(sigma**-2, max=self.gamma)


class EDMWeighting(X0Weighting):
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Karras et al. 2022, Table 1, "EDM").

    With the EDM parameterization this makes the loss on the network's own output F unit-weighted.
    """

    def __init__(self, sigma_data: float = 0.5):
        if sigma_data <= 0:
            raise ValueError(f"EDMWeighting: sigma_data must be > 0, got {sigma_data}")
        self.sigma_data = float(sigma_data)

    def x0_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


# ---------------------------------------------------------------------------------------------- noise
def offset_noise(x: torch.Tensor, strength: float) -> torch.Tensor:
    """eps + strength * N(0, 1) per sample and channel (Guttenberg 2023, "Diffusion with Offset Noise")."""
    noise = torch.randn_like(x)
    if strength == 0:
        return noise
    offset = torch.randn(x.shape[0], x.shape[1], *((1,) * (x.ndim - 2)), device=x.device, dtype=x.dtype)
    return noise + strength * offset


# ---------------------------------------------------------------------------------------------- the loss
class Trainee(Protocol):
    """What DiffusionLoss reads from a diffusion model (DDPM and LatentDiffusion provide it)."""

    schedule: NoiseSchedule
    parameterization: str
    logvar: torch.Tensor
    lvlb_weights: torch.Tensor
    training: bool

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor: ...

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None) -> Any: ...


def _build(config: Any, default: Any, kind: type, path: str) -> Any:
    """An already built part, a target/params config, or the default when None."""
    if config is None:
        return default
    part = config if isinstance(config, kind) else instantiate_from_config(config, path=path)
    if not isinstance(part, kind):
        raise ConfigError(f"{path}: expected a {kind.__name__}, got {type(part).__name__}")
    return part


class DiffusionLoss(nn.Module):
    """Timestep sampler + loss weighting + training target + l1/l2, with the original LDM's loss extras."""

    def __init__(
        self,
        sigma_sampler_config: Any = None,
        loss_weighting_config: Any = None,
        offset_noise_strength: float = 0.0,
        loss_type: str = "l2",
        l_simple_weight: float = 1.0,
        original_elbo_weight: float = 0.0,
        learn_logvar: bool = False,
    ):
        super().__init__()
        self.sampler = _build(sigma_sampler_config, UniformTimesteps(), TimestepSampler,
                              "model.params.loss_config.params.sigma_sampler_config")
        self.weighting = _build(loss_weighting_config, UnitWeighting(), LossWeighting,
                                "model.params.loss_config.params.loss_weighting_config")
        self.offset_noise_strength = float(offset_noise_strength)
        self.loss_type = check_loss_type(loss_type)
        self.l_simple_weight = l_simple_weight
        self.original_elbo_weight = original_elbo_weight
        self.learn_logvar = learn_logvar

    def sample_timesteps(self, batch_size: int, schedule: NoiseSchedule, device: torch.device | str,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times for a batch, from the configured sampler."""
        return self.sampler(batch_size, schedule, device, generator)

    def sample_weights(self, schedule: NoiseSchedule, parameterization: str, t: torch.Tensor) -> torch.Tensor | None:
        """The weighting's per-sample weight of the target loss at times t (None for the unit weight)."""
        alpha_bar = schedule.alpha_bar(t.cpu(), 1, torch.float64)
        sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
        weight = self.weighting(sigma, x0_error_scale(parameterization, alpha_bar), self.loss_type)
        return None if weight is None else weight.to(t.device, torch.float32)

    def forward(self, model: Trainee, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                cond: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss at times t and its logged terms; noise defaults to (offset) Gaussian noise."""
        if noise is None:
            noise = offset_noise(x_start, self.offset_noise_strength)
        x_noisy = model.q_sample(x_start=x_start, t=t, noise=noise)
        model_output = model.apply_model(x_noisy, t, cond)
        alpha_bar = model.schedule.alpha_bar(t, x_start.ndim)
        target = training_target(model.parameterization, x_start, noise, alpha_bar.to(x_start.device))
        loss_per_sample = elementwise_loss(model_output, target, self.loss_type).mean(dim=list(range(1, x_start.ndim)))
        weight = self.sample_weights(model.schedule, model.parameterization, t)
        simple = loss_per_sample if weight is None else weight.to(loss_per_sample.dtype) * loss_per_sample
        return self.combine(model, simple, loss_per_sample, t)

    def combine(self, model: Trainee, simple: torch.Tensor, unweighted: torch.Tensor,
                t: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The original's total: l_simple_weight * (simple / exp(logvar_t) + logvar_t) + elbo weight * VLB term."""
        prefix = "train" if model.training else "val"
        loss_dict = {f"{prefix}/loss_simple": simple.mean()}
        logvar_t = model.logvar.to(t.device)[t]
        loss = simple / torch.exp(logvar_t) + logvar_t
        if self.learn_logvar:
            loss_dict[f"{prefix}/loss_gamma"] = loss.mean()
            loss_dict["logvar"] = model.logvar.data.mean()
        loss = self.l_simple_weight * loss.mean()
        loss_vlb = (model.lvlb_weights[t] * unweighted).mean()
        loss_dict[f"{prefix}/loss_vlb"] = loss_vlb
        loss = loss + self.original_elbo_weight * loss_vlb
        loss_dict[f"{prefix}/loss"] = loss
        return loss, loss_dict


MODEL_LOSS_PARAMS = ("loss_type", "l_simple_weight", "original_elbo_weight", "learn_logvar")


def build_diffusion_loss(config: Any, **model_params: Any) -> DiffusionLoss:
    """The model's DiffusionLoss from its `loss_config` (None: the original loss), with the model's own
    loss parameters (loss_type, l_simple_weight, original_elbo_weight, learn_logvar) passed through."""
    if config is None:
        return DiffusionLoss(**model_params)
    params = (config.get("params") if hasattr(config, "get") else None) or {}
    clash = sorted(set(params) & set(MODEL_LOSS_PARAMS))
    if clash:
        raise ConfigError(
            f"model.params.loss_config.params.{clash[0]}: set model.params.{clash[0]} on the model instead "
            f"(the model passes {', '.join(MODEL_LOSS_PARAMS)} to its loss)"
        )
    loss = instantiate_from_config(config, path="model.params.loss_config", **model_params)
    if not isinstance(loss, DiffusionLoss):
        raise ConfigError(f"model.params.loss_config: expected a DiffusionLoss, got {type(loss).__name__}")
    return loss
