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

Times are grid indices of the model's schedule (`ldm.sampling.schedule`): integer timesteps of the
discrete VP process, fractional indices of the continuous EDM and flow processes. Weightings are
defined, as in sgm, on the error of the denoised estimate x0_hat at the VE noise level
sigma = sigma(t) / alpha(t); the loss is computed on the parameterization's own target, so a
weighting is carried over by the factor d x0_hat / d output (e.g. sigma for eps-prediction).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.sampling.parameterization import input_scale, to_prediction, training_target
from ldm.sampling.schedule import FlowSchedule, NoiseSchedule, Schedule
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


def _rand(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None,
          normal: bool) -> torch.Tensor:
    """Standard normal or uniform [0, 1) draws; with a generator, drawn on the generator's device and moved."""
    draw = torch.randn if normal else torch.rand
    if generator is None:
        return draw(shape, device=device)
    return draw(shape, generator=generator, device=generator.device).to(device)


# ---------------------------------------------------------------------------------------------- timestep samplers
class TimestepSampler(ABC):
    """Draws one training time per batch element as a grid index of the schedule: integer timesteps for the
    discrete NoiseSchedule, fractional indices (`Schedule.t_to_sigma`) for the continuous EDM and flow processes."""

    @abstractmethod
    def __call__(self, batch_size: int, schedule: Schedule, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times for a batch of `batch_size`."""


UNIT_EPS = 1e-5  # keeps continuous times off the ends of [0, 1], where some weights are 0 * inf


def unit_to_timesteps(u: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Map u in [0, 1] (0 clean, 1 pure noise) onto grid indices of the schedule.

    Discrete VP: floor(u * T), the way diffusers' SD3 training script turns a density on [0, 1] into indices.
    Continuous processes: u is a rectified-flow time, t = u shifted by SD3's shift for a FlowSchedule
    (Esser et al. 2024, eq. 23), at the VE level s = t / (1 - t) (the flow's, Esser et al. 2024 sec. 3.1).
    """
    if isinstance(schedule, NoiseSchedule):
        steps = schedule.num_timesteps
        return (u * steps).long().clamp(0, steps - 1)
    t = u.double().clamp(UNIT_EPS, 1 - UNIT_EPS)
    if isinstance(schedule, FlowSchedule):
        t = schedule.warp(t)
    return schedule.sigma_to_t(FlowSchedule.level(t)).to(u.device, torch.float32)


def sigmas_to_timesteps(sigma: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Grid indices of VE levels: the nearest integer timestep (in log sigma) for a NoiseSchedule, else fractional."""
    if isinstance(schedule, NoiseSchedule):
        return schedule.sigma_to_t(sigma.double(), quantize=True).long().to(sigma.device)
    return schedule.sigma_to_t(sigma.double()).to(sigma.device, torch.float32)


class UniformTimesteps(TimestepSampler):
    """t ~ U{0, ..., T-1}, drawn with the same `torch.randint` call as the original DDPM (Ho et al. 2020, Alg. 1);
    on a continuous process u ~ U(0, 1) through `unit_to_timesteps` (rectified flow's uniform time)."""

    def __call__(self, batch_size: int, schedule: Schedule, device: torch.device | str = "cpu",
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

    def __call__(self, batch_size: int, schedule: Schedule, device: torch.device | str = "cpu",
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

    def __call__(self, batch_size: int, schedule: Schedule, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return unit_to_timesteps(self.unit(batch_size, device, generator), schedule)


class EDMLogNormalSigmas(TimestepSampler):
    """ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1, EDM training: P_mean = -1.2, P_std = 1.2),
    as grid indices of the schedule (`sigmas_to_timesteps`)."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        if p_std <= 0:
            raise ValueError(f"EDMLogNormalSigmas: p_std must be > 0, got {p_std}")
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def sigmas(self, batch_size: int, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draws of sigma from the log-normal density."""
        return torch.exp(self.p_mean + self.p_std * _rand((batch_size,), torch.device(device), generator, normal=True))

    def __call__(self, batch_size: int, schedule: Schedule, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return sigmas_to_timesteps(self.sigmas(batch_size, device, generator), schedule)


# ---------------------------------------------------------------------------------------------- loss weightings
def x0_error_scale(parameterization: str, alpha: torch.Tensor, sigma: torch.Tensor,
                   sigma_data: float = 0.5) -> torch.Tensor:
    """d x0_hat / d output at fixed x_t: an error e in the training target is an error scale * e in x0_hat.

    Read off the parameterization's own conversion (x0_hat is linear in the output): -sigma / alpha for eps,
    1 for x0, -sigma / (alpha^2 + sigma^2) for v, -sigma / (alpha + sigma) for flow, c_out for edm.
    """
    zero = torch.zeros_like(alpha)
    return to_prediction(parameterization, torch.ones_like(alpha), zero, alpha, sigma, sigma_data).x0


class LossWeighting(ABC):
    """A per-sample weight of the loss on the training target."""

    @abstractmethod
    def __call__(self, sigma: torch.Tensor, scale: torch.Tensor, loss_type: str = "l2",
                 sigma_data: float = 0.5) -> torch.Tensor | None:
        """The weight at VE noise levels sigma, given the x0 error scale of the parameterization and the
        process's sigma_data (None: no weight)."""


class UnitWeighting(LossWeighting):
    """The plain loss on the training target (the original LDM objective, Ho et al. 2020's L_simple)."""

    def __call__(self, sigma: torch.Tensor, scale: torch.Tensor, loss_type: str = "l2",
                 sigma_data: float = 0.5) -> None:
        """No weight: the loss is left untouched (so the default path stays bit-identical)."""
        return None


class X0Weighting(LossWeighting):
    """A weighting defined, as in sgm, by the weight lambda(sigma) of the x0 error at VE noise level sigma."""

    @abstractmethod
    def x0_weight(self, sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
        """lambda(sigma): the weight of d(x0_hat, x0) at noise level sigma (per sample)."""

    def __call__(self, sigma: torch.Tensor, scale: torch.Tensor, loss_type: str = "l2",
                 sigma_data: float = 0.5) -> torch.Tensor:
        """The weight of d(output, target): lambda(sigma) * |scale|^p, p = 2 for l2 and 1 for l1."""
        power = 2 if loss_type == "l2" else 1
        return self.x0_weight(sigma, sigma_data) * scale.abs() ** power


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

    def x0_weight(self, sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
        return torch.clamp(sigma**-2, max=self.gamma)


class EDMWeighting(X0Weighting):
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Karras et al. 2022, Table 1, "EDM").

    With the EDM parameterization this makes the loss on the network's own output F unit-weighted. sigma_data
    defaults to the process's (`Schedule.sigma_data`, 0.5 unless an EDMSchedule says otherwise).
    """

    def __init__(self, sigma_data: float | None = None):
        if sigma_data is not None and sigma_data <= 0:
            raise ValueError(f"EDMWeighting: sigma_data must be > 0, got {sigma_data}")
        self.sigma_data = None if sigma_data is None else float(sigma_data)

    def x0_weight(self, sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
        sd = sigma_data if self.sigma_data is None else self.sigma_data
        return (sigma**2 + sd**2) / (sigma * sd) ** 2


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

    schedule: Schedule
    parameterization: str
    logvar: torch.Tensor
    lvlb_weights: torch.Tensor
    training: bool

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor: ...

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None) -> Any: ...


def network_time(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """The network's time input at grid indices t: the integer timesteps themselves for a NoiseSchedule (as the
    original), else the process's `model_time` (c_noise = ln(sigma) / 4 for EDM, t * 1000 for flow)."""
    if isinstance(schedule, NoiseSchedule):
        return t
    return schedule.model_time(schedule.t_to_sigma(t)).to(t.device, torch.float32)


def grid_index(t: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """Integer timesteps for per-timestep tables (learned logvar, VLB weights): fractional indices rounded."""
    if t.is_floating_point():
        return t.round().long().clamp(0, num_timesteps - 1)
    return t


def _build(config: Any, default: Any, kind: type, path: str) -> Any:
    """An already built part, a target/params config, or the default when None."""
    if config is None:
        return default
    part = config if isinstance(config, kind) else instantiate_from_config(config, path=path)
    if not isinstance(part, kind):
        raise ConfigError(f"{path}: expected a {kind.__name__}, got {type(part).__name__}")
    return part


class DiffusionLoss(nn.Module):
    """Timestep sampler + loss weighting + training target + l1/l2, with the original LDM's loss extras.

    The network sees x_t (times c_in / alpha for edm, `parameterization.input_scale`) and `network_time(t)`,
    and is trained towards `training_target` of its parameterization.
    """

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

    def sample_timesteps(self, batch_size: int, schedule: Schedule, device: torch.device | str,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times for a batch, from the configured sampler."""
        return self.sampler(batch_size, schedule, device, generator)

    def sample_weights(self, schedule: Schedule, parameterization: str, t: torch.Tensor) -> torch.Tensor | None:
        """The weighting's per-sample weight of the target loss at times t (None for the unit weight)."""
        if isinstance(self.weighting, UnitWeighting):
            return None
        level = schedule.t_to_sigma(t.cpu()).reshape(-1)
        alpha, sigma = schedule.alpha_sigma(level)
        scale = x0_error_scale(parameterization, alpha, sigma, schedule.sigma_data)
        weight = self.weighting(level, scale, self.loss_type, schedule.sigma_data)
        if not bool(torch.isfinite(weight).all()):
            bad = t.cpu().reshape(-1)[~torch.isfinite(weight)][0]
            raise ValueError(f"{type(self.weighting).__name__} gives a non-finite weight at t={float(bad):g} for the "
                             f"'{parameterization}' parameterization (e.g. eps-prediction at zero terminal SNR)")
        return weight.to(t.device, torch.float32)

    def forward(self, model: Trainee, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                cond: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss at times t and its logged terms; noise defaults to (offset) Gaussian noise."""
        if noise is None:
            noise = offset_noise(x_start, self.offset_noise_strength)
        schedule, parameterization = model.schedule, model.parameterization
        x_noisy = model.q_sample(x_start=x_start, t=t, noise=noise)
        alpha, sigma = schedule.coefficients(t, x_start)
        scale = input_scale(parameterization, alpha, sigma, schedule.sigma_data)
        x_in = x_noisy if isinstance(scale, float) and scale == 1.0 else scale * x_noisy
        model_output = model.apply_model(x_in, network_time(schedule, t), cond)
        target = training_target(parameterization, x_start, noise, alpha, sigma, schedule.sigma_data)
        loss_per_sample = elementwise_loss(model_output, target, self.loss_type).mean(dim=list(range(1, x_start.ndim)))
        weight = self.sample_weights(schedule, parameterization, t)
        simple = loss_per_sample if weight is None else weight.to(loss_per_sample.dtype) * loss_per_sample
        return self.combine(model, simple, loss_per_sample, grid_index(t, schedule.num_timesteps))

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
