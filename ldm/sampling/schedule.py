"""The forward process of every model, in one place: x_t = alpha(t) x0 + sigma(t) eps.

Three processes share one interface (`Schedule`):

- `NoiseSchedule`: the discrete variance-preserving process of DDPM / LDM / Stable Diffusion (betas over T
  integer timesteps), optionally rescaled to zero terminal SNR;
- `EDMSchedule`: the continuous variance-exploding process of Karras et al. 2022 (alpha = 1, sigma = s);
- `FlowSchedule`: rectified flow, x_t = (1 - t) x0 + t eps (Liu et al. 2022; Esser et al. 2024 for the shift).

Samplers see every process in the k-diffusion manner, through its VE-normalised noise level
s = sigma / alpha (x_t / alpha = x0 + s eps): `alpha_sigma(s)` gives the process coefficients back,
`model_time(s)` the network's time input. All timestep / noise-level spacing lives here too (`spacing`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt", "squaredcos_cap_v2")
GRID_SPACINGS = ("leading", "trailing", "linspace", "uniform", "quad")
SPACINGS = (*GRID_SPACINGS, "karras", "exponential")
FINALS = ("zero", "min", "none")

Tensorish = torch.Tensor | float | Sequence[float] | np.ndarray


# ----------------------------------------------------------------------------------------- betas
def betas_for_alpha_bar(alpha_bar: Any, num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous alpha_bar(t), t in [0, 1], into betas (Nichol & Dhariwal 2021, eq. 17)."""
    betas = [
        min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.asarray(betas, dtype=np.float64)


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """Betas of a named noise schedule, as a float64 numpy array of length n_timestep.

    "linear" is linear in sqrt(beta) (the LDM/SD "scaled linear" schedule); "cosine" is
    Nichol & Dhariwal 2021 eq. 17 with offset `cosine_s`; "squaredcos_cap_v2" is the same cosine
    with s=0.008 sampled at interval ends, as in diffusers/sgm.
    """
    if schedule == "linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64).pow(2).numpy()
    if schedule == "cosine":
        t = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas = torch.cos(t / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = 1 - alphas[1:] / alphas[:-1]
        return betas.clamp(min=0, max=0.999).numpy()
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64).numpy()
    if schedule == "sqrt":
        return torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64).sqrt().numpy()
    if schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2, n_timestep)
    raise ValueError(f"schedule '{schedule}' unknown; expected one of {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: Tensorish) -> torch.Tensor:
    """Betas rescaled so that alpha_bar_T = 0 exactly (Lin et al. 2023, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Algorithm 1): sqrt(alpha_bar) is shifted to end at 0 and scaled to keep its start."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


# ----------------------------------------------------------------------------------------- helpers
def _f64(values: Tensorish) -> torch.Tensor:
    """values as a float64 CPU tensor."""
    return torch.as_tensor(values, dtype=torch.float64).cpu() if not isinstance(values, torch.Tensor) \
        else values.detach().to("cpu", torch.float64)


def _vp_alpha_sigma(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) of a variance-preserving process at VE level s: alpha = 1/sqrt(1+s^2), sigma = s alpha."""
    alpha = (1.0 + s * s).rsqrt()
    sigma = torch.where(torch.isinf(s), torch.ones_like(s), s * alpha)
    return torch.where(torch.isinf(s), torch.zeros_like(s), alpha), sigma


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values reshaped to broadcast over `like`, on its device and in its (float) dtype."""
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return values.reshape(-1, *((1,) * (like.ndim - 1))).to(like.device, dtype)


class Schedule:
    """What every forward process offers samplers and training: x_t = alpha x0 + sigma eps, indexed by the
    VE-normalised level s = sigma / alpha, and a grid of `num_timesteps` levels (index 0 the least noisy)."""

    num_timesteps: int
    sigma_data: float = 0.5  # the data standard deviation EDM preconditioning assumes (Karras et al. 2022)

    def alpha_sigma(self, s: Tensorish) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) of the process at VE levels s (float64); s = inf gives (0, 1) where defined."""
        raise NotImplementedError

    def model_time(self, s: Tensorish) -> torch.Tensor:
        """The time input the network was trained with at VE levels s (float64)."""
        raise NotImplementedError

    def t_to_sigma(self, t: Tensorish) -> torch.Tensor:
        """VE level at (fractional) grid indices t in [0, num_timesteps - 1]."""
        raise NotImplementedError

    def sigma_to_t(self, s: Tensorish) -> torch.Tensor:
        """Fractional grid index of VE levels s (inverse of t_to_sigma)."""
        raise NotImplementedError

    @property
    def sigma_min(self) -> float:
        """The lowest VE level of the grid (index 0)."""
        return float(self.t_to_sigma(0.0))

    @property
    def sigma_max(self) -> float:
        """The highest VE level of the grid (index num_timesteps - 1); inf when the last level is pure noise."""
        return float(self.t_to_sigma(float(self.num_timesteps - 1)))

    def buffers(self) -> dict[str, torch.Tensor]:
        """float32 tensors to register on a model under the original DDPM buffer names (none by default)."""
        return {}

    def _scale(self, s: Tensorish, like: torch.Tensor) -> torch.Tensor:
        """alpha(s) broadcast against `like`, 1 at an infinite level (where latents are held in the process scale)."""
        s = _f64(s).reshape(-1)
        alpha = self.alpha_sigma(s)[0]
        return _broadcast(torch.where(torch.isinf(s), torch.ones_like(alpha), alpha), like)

    def to_ve(self, x_t: torch.Tensor, s: Tensorish) -> torch.Tensor:
        """The VE-normalised latent x_t / alpha(s) samplers work on (x_t itself at an infinite level)."""
        return x_t / self._scale(s, x_t)

    def from_ve(self, x: torch.Tensor, s: Tensorish) -> torch.Tensor:
        """The process-scale latent x alpha(s) of a VE-normalised one (x itself at an infinite level)."""
        return x * self._scale(s, x)

    def add_noise(self, x0: torch.Tensor, s: Tensorish, noise: torch.Tensor) -> torch.Tensor:
        """x_t = alpha(s) x0 + sigma(s) noise for one VE level per sample (or one for all)."""
        s = _f64(s).reshape(-1)
        alpha, sigma = self.alpha_sigma(s)
        return _broadcast(alpha, x0) * x0 + _broadcast(sigma, x0) * noise

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) at grid indices t (one per sample)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return self.add_noise(x_start, self.t_to_sigma(t), noise)

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) at grid indices t, broadcast against `like` on its device and dtype."""
        alpha, sigma = self.alpha_sigma(self.t_to_sigma(t).reshape(-1))
        return _broadcast(alpha, like), _broadcast(sigma, like)


# ----------------------------------------------------------------------------------------- discrete VP
def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] reshaped to broadcast over a tensor with `ndim` dimensions."""
    out = values.to(t.device)[t]
    return out.reshape(t.shape[0], *((1,) * (ndim - 1)))


@dataclass(frozen=True)
class NoiseSchedule(Schedule):
    """Betas of a discrete diffusion process and their derived quantities (Ho et al. 2020, eqs. 4, 6, 7).

    Everything is kept in float64 on the CPU; `buffers()` gives float32 tensors under the original DDPM
    buffer names. Its VE levels are s_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) (`sigmas`); with zero terminal
    SNR the last one is infinite.
    """

    betas: torch.Tensor
    v_posterior: float = 0.0
    alphas_cumprod: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be a 1-D sequence of at least 2 values, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        if bool((betas[:-1] == 1).any()):
            raise ValueError("only the last beta may be 1 (alpha_bar reaches 0 at the last timestep only)")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def from_config(
        cls,
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        given_betas: Sequence[float] | np.ndarray | None = None,
        v_posterior: float = 0.0,
        zero_terminal_snr: bool = False,
    ) -> "NoiseSchedule":
        """Build from the DDPM constructor's schedule parameters (given_betas wins when set); `zero_terminal_snr`
        rescales the betas so that the last timestep is pure noise (`rescale_zero_terminal_snr`)."""
        if given_betas is not None:
            betas = torch.as_tensor(np.asarray(given_betas, dtype=np.float64))
        else:
            betas = torch.from_numpy(make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start,
                                                        linear_end=linear_end, cosine_s=cosine_s))
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas, v_posterior=v_posterior)

    @property
    def num_timesteps(self) -> int:  # type: ignore[override]
        """Number of discrete training timesteps T."""
        return len(self.betas)

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether the last timestep is pure noise (alpha_bar_T = 0)."""
        return bool(self.alphas_cumprod[-1] == 0)

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        """alpha_bar_{t-1}, with alpha_bar_{-1} = 1."""
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    @property
    def posterior_variance(self) -> torch.Tensor:
        """Variance of q(x_{t-1} | x_t, x_0), blended with beta_t by v_posterior (Ho et al. 2020, eq. 7)."""
        a, a_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        tilde_beta = self.betas * (1.0 - a_prev) / (1.0 - a)
        return (1 - self.v_posterior) * tilde_beta + self.v_posterior * self.betas

    @cached_property
    def sigmas(self) -> torch.Tensor:
        """VE levels s_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for t = 0..T-1 (k-diffusion's DiscreteSchedule)."""
        a = self.alphas_cumprod
        return ((1.0 - a) / a).sqrt()

    @cached_property
    def log_sigmas(self) -> torch.Tensor:
        """log of `sigmas`."""
        return self.sigmas.log()

    def alpha_sigma(self, s: Tensorish) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(alpha_bar), sqrt(1 - alpha_bar)) at VE levels s."""
        return _vp_alpha_sigma(_f64(s))

    def model_time(self, s: Tensorish) -> torch.Tensor:
        """The (fractional) training timestep of VE levels s."""
        return self.sigma_to_t(s)

    def t_to_sigma(self, t: Tensorish) -> torch.Tensor:
        """VE levels at fractional timesteps, interpolated linearly in log sigma (k-diffusion's t_to_sigma)."""
        t = _f64(t)
        if bool(((t < 0) | (t > self.num_timesteps - 1)).any()):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}], got {t.min():g}..{t.max():g}")
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        between = ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()
        return torch.where(w == 0, self.sigmas[low], between)  # table levels exactly, so sigma_to_t gives t back

    def sigma_to_t(self, s: Tensorish, quantize: bool = False) -> torch.Tensor:
        """Fractional timesteps of VE levels s, interpolating linearly in log sigma (k-diffusion's DiscreteSchedule,
        diffusers' `_sigma_to_t`); `quantize` rounds to the nearest timestep in log sigma. Levels in the table give
        their integer timestep exactly; levels beyond the table are clamped to its ends, as the references do."""
        s = _f64(s)
        sigmas, log_sigmas, last = self.sigmas, self.log_sigmas, self.num_timesteps - 1
        finite_max = float(sigmas[-2]) if self.zero_terminal_snr else math.inf
        between = (s > finite_max) & torch.isfinite(s)
        if bool(between.any()):
            raise ValueError(f"noise level {float(s[between].reshape(-1)[0]):g} lies between the last finite level "
                             f"{finite_max:g} and the infinite terminal level of this zero-terminal-SNR schedule")
        log_s = s.clamp(min=1e-300).log()
        finite_logs = log_sigmas[:last] if self.zero_terminal_snr else log_sigmas
        if quantize:
            t = (log_s.reshape(-1, 1) - finite_logs.reshape(1, -1)).abs().argmin(dim=1).to(torch.float64)
        else:
            low = torch.searchsorted(sigmas[: len(finite_logs)], s.reshape(-1), right=True) - 1
            low = low.clamp(0, len(finite_logs) - 2)
            lo, hi = finite_logs[low], finite_logs[low + 1]
            w = ((lo - log_s.reshape(-1)) / (lo - hi)).clamp(0, 1)
            w = torch.where(s.reshape(-1) == sigmas[low], torch.zeros_like(w), w)
            w = torch.where(s.reshape(-1) == sigmas[low + 1], torch.ones_like(w), w)
            t = low.to(torch.float64) + w
        t = torch.where(torch.isinf(s.reshape(-1)), torch.full_like(t, float(last)), t)
        return t.reshape(s.shape)

    def buffers(self) -> dict[str, torch.Tensor]:
        """float32 tensors under the buffer names of the original DDPM class (checkpoints hold them)."""
        return dict(self._buffers)

    @cached_property
    def _buffers(self) -> dict[str, torch.Tensor]:
        a, a_prev, betas = self.alphas_cumprod, self.alphas_cumprod_prev, self.betas
        post_var = self.posterior_variance
        values = {
            "betas": betas,
            "alphas_cumprod": a,
            "alphas_cumprod_prev": a_prev,
            "sqrt_alphas_cumprod": a.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - a).sqrt(),
            "log_one_minus_alphas_cumprod": (1.0 - a).log(),
            "sqrt_recip_alphas_cumprod": a.rsqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / a - 1).sqrt(),
            "posterior_variance": post_var,
            # the variance is 0 at t=0: clip before the log as the original LDM code does
            "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
            "posterior_mean_coef1": betas * a_prev.sqrt() / (1.0 - a),
            "posterior_mean_coef2": (1.0 - a_prev) * (1.0 - betas).sqrt() / (1.0 - a),
        }
        return {name: value.float() for name, value in values.items()}

    def alpha_bar(self, t: torch.Tensor, ndim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """alpha_bar_t for integer timesteps t, broadcastable over an `ndim`-dimensional batch."""
        return _gather(self.alphas_cumprod, t.long(), ndim).to(dtype)

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) at integer timesteps t, broadcast against `like`."""
        a = self.alphas_cumprod.to(t.device)[t.long()]
        return _broadcast(a.sqrt(), like), _broadcast((1.0 - a).sqrt(), like)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (Ho et al. 2020, eq. 4)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        a = self.alpha_bar(t, x_start.ndim, torch.float64)
        out = a.sqrt().to(x_start.device) * x_start + (1 - a).sqrt().to(x_start.device) * noise
        return out.to(x_start.dtype)

    def q_posterior(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eqs. 6-7)."""
        buf = self._buffers
        dev, nd = x_t.device, x_t.ndim
        mean = (_gather(buf["posterior_mean_coef1"], t, nd).to(dev) * x_start
                + _gather(buf["posterior_mean_coef2"], t, nd).to(dev) * x_t)
        var = _gather(buf["posterior_variance"], t, nd).to(dev)
        log_var = _gather(buf["posterior_log_variance_clipped"], t, nd).to(dev)
        return mean, var, log_var


# ----------------------------------------------------------------------------------------- EDM and flow
@dataclass(frozen=True)
class EDMSchedule(Schedule):
    """The variance-exploding process of Karras et al. 2022 ("Elucidating the Design Space...", EDM): x_s = x0 + s eps.

    Its grid is the EDM discretisation (eq. 5) over `num_timesteps` levels from sigma_min (index 0) to sigma_max;
    the network's time input is c_noise = ln(s) / 4 (Table 1).
    """

    sigma_min: float = 0.002  # type: ignore[assignment]
    sigma_max: float = 80.0  # type: ignore[assignment]
    sigma_data: float = 0.5
    rho: float = 7.0
    num_timesteps: int = 1000

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max < math.inf:
            raise ValueError(f"EDMSchedule needs 0 < sigma_min < sigma_max < inf, got {self.sigma_min}, {self.sigma_max}")
        if self.sigma_data <= 0 or self.rho <= 0 or self.num_timesteps < 2:
            raise ValueError("EDMSchedule needs sigma_data > 0, rho > 0 and num_timesteps >= 2")

    def alpha_sigma(self, s: Tensorish) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, s): the process is variance exploding."""
        s = _f64(s)
        return torch.ones_like(s), s

    def model_time(self, s: Tensorish) -> torch.Tensor:
        """c_noise = ln(s) / 4 (Karras et al. 2022, Table 1)."""
        return _f64(s).log() / 4

    def t_to_sigma(self, t: Tensorish) -> torch.Tensor:
        """(sigma_min^(1/rho) + t / (T-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho (Karras et al. 2022, eq. 5)."""
        ramp = _f64(t) / (self.num_timesteps - 1)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (lo + ramp * (hi - lo)) ** self.rho

    def sigma_to_t(self, s: Tensorish) -> torch.Tensor:
        """Inverse of t_to_sigma."""
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (_f64(s) ** (1 / self.rho) - lo) / (hi - lo) * (self.num_timesteps - 1)


@dataclass(frozen=True)
class FlowSchedule(Schedule):
    """Rectified flow (Liu et al. 2022, "Flow Straight and Fast"): x_t = (1 - t) x0 + t eps, t in [0, 1].

    The grid holds t_k = shift((k + 1) / T), k = 0..T-1, with SD3's shift t' = shift t / (1 + (shift - 1) t)
    (Esser et al. 2024, "Scaling Rectified Flow Transformers", eq. 23), so the last level is pure noise (s = inf).
    The network's time input is t * 1000 (the SD3 convention). The VE level is s = t / (1 - t).
    """

    shift: float = 1.0
    num_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.shift <= 0 or self.num_timesteps < 2:
            raise ValueError(f"FlowSchedule needs shift > 0 and num_timesteps >= 2, got {self.shift}, {self.num_timesteps}")

    def warp(self, t: Tensorish) -> torch.Tensor:
        """SD3's time shift t -> shift t / (1 + (shift - 1) t)."""
        t = _f64(t)
        return self.shift * t / (1 + (self.shift - 1) * t)

    def unwarp(self, t: Tensorish) -> torch.Tensor:
        """Inverse of warp."""
        t = _f64(t)
        return t / (self.shift - (self.shift - 1) * t)

    @staticmethod
    def flow_time(s: Tensorish) -> torch.Tensor:
        """t = s / (1 + s) of VE levels s (1 for s = inf)."""
        s = _f64(s)
        return torch.where(torch.isinf(s), torch.ones_like(s), s / (1 + s))

    @staticmethod
    def level(t: Tensorish) -> torch.Tensor:
        """VE level s = t / (1 - t) of flow times t (inf at t = 1)."""
        t = _f64(t)
        return torch.where(t >= 1, torch.full_like(t, math.inf), t / (1 - t).clamp(min=1e-300))

    def alpha_sigma(self, s: Tensorish) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - t, t) with t = s / (1 + s)."""
        t = self.flow_time(s)
        return 1 - t, t

    def model_time(self, s: Tensorish) -> torch.Tensor:
        """t * 1000."""
        return self.flow_time(s) * 1000

    def t_to_sigma(self, t: Tensorish) -> torch.Tensor:
        """VE level of grid index t: s(shift((t + 1) / T))."""
        return self.level(self.warp((_f64(t) + 1) / self.num_timesteps))

    def sigma_to_t(self, s: Tensorish) -> torch.Tensor:
        """Inverse of t_to_sigma."""
        return self.unwarp(self.flow_time(s)) * self.num_timesteps - 1


def build_schedule(process_config: Any = None, **vp_params: Any) -> Schedule:
    """The process a model config asks for: `process_config` = {target, params} names a Schedule class; None (or a
    NoiseSchedule target) builds the discrete VP schedule from `vp_params` (the DDPM beta parameters), which the
    config's params override (e.g. `zero_terminal_snr: true`)."""
    from ldm.util import get_obj_from_str

    if process_config is None:
        return NoiseSchedule.from_config(**vp_params)
    if "target" not in process_config:
        raise ValueError("process_config needs a 'target' (e.g. ldm.sampling.schedule.FlowSchedule) and optional params")
    cls = get_obj_from_str(process_config["target"])
    params = dict(process_config.get("params", None) or {})
    if isinstance(cls, type) and issubclass(cls, NoiseSchedule):
        return cls.from_config(**{**vp_params, **params})
    if not (isinstance(cls, type) and issubclass(cls, Schedule)):
        raise ValueError(f"process_config target '{process_config['target']}' is not a ldm.sampling.schedule.Schedule")
    return cls(**params)


# ----------------------------------------------------------------------------------------- spacing
def spaced_timesteps(kind: str, n: int, num_train_timesteps: int, steps_offset: int = 0) -> np.ndarray:
    """Descending grid indices for n sampling steps (Lin et al. 2023, Table 2, and the original DDIM):

    - leading: (0, T//n, 2 T//n, ...) + steps_offset (SD's DDIM/PNDM with steps_offset=1);
    - trailing: round(T, T - T/n, ...) - 1, so the first step is the last (noisiest) index;
    - linspace: linspace(0, T - 1, n), fractional (k-diffusion's get_sigmas, diffusers' Euler family);
    - uniform: range(0, T, T//n) + 1 (the original DDIM "uniform", which may give more than n steps);
    - quad: (linspace(0, sqrt(0.8 T), n)^2 as int) + 1 (the original DDIM "quad").
    """
    T = num_train_timesteps
    if n < 1:
        raise ValueError(f"number of sampling steps must be at least 1, got {n}")
    if kind == "leading":
        steps = np.arange(n, dtype=np.float64) * (T // n) + steps_offset
    elif kind == "trailing":
        steps = np.round(np.arange(T, 0, -T / n)) - 1
    elif kind == "linspace":
        steps = np.linspace(0, T - 1, n)
    elif kind == "uniform":
        steps = np.arange(0, T, max(T // n, 1), dtype=np.float64) + 1
    elif kind == "quad":
        steps = (np.linspace(0, np.sqrt(T * 0.8), n) ** 2).astype(int).astype(np.float64) + 1
    else:
        raise ValueError(f"timestep spacing '{kind}' unknown; expected one of leading, trailing, linspace, uniform, quad")
    steps = np.sort(steps)[::-1].copy()
    if steps[0] > T - 1 or steps[-1] < 0:
        raise ValueError(f"{n} steps with '{kind}' spacing reach timestep {steps[0]:g} outside [0, {T - 1}]; "
                         "choose another number of steps")
    return steps if kind == "linspace" else steps.astype(np.int64)


def dpm_solver_timesteps(n: int, num_train_timesteps: int) -> np.ndarray:
    """diffusers' DPMSolverMultistepScheduler "linspace" timesteps: n + 1 rounded, evenly spaced timesteps from T-1
    down, the t=0 end left out (Lin et al. 2023, Table 2); the ladder of the original `--dpm` sampler."""
    if not 1 <= n < num_train_timesteps:
        raise ValueError(f"number of sampling steps must lie in [1, {num_train_timesteps - 1}], got {n}")
    return np.round(spaced_timesteps("linspace", n + 1, num_train_timesteps))[:-1].astype(np.int64)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """n levels (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho (Karras et al. 2022, eq. 5)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n levels evenly spaced in log sigma from sigma_max down to sigma_min."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def usable_spacing(kind: str, schedule: Schedule) -> str:
    """`kind`, unless it is karras / exponential on a schedule whose last level is pure noise (zero terminal SNR,
    flow), where those ladders do not exist: then trailing for a discrete VP schedule (Lin et al. 2023, sec. 3.3) and
    linspace otherwise (diffusers' FlowMatchEulerDiscreteScheduler)."""
    if kind in ("karras", "exponential") and math.isinf(schedule.sigma_max):
        return "trailing" if isinstance(schedule, NoiseSchedule) else "linspace"
    return kind


def spacing(
    kind: str,
    n: int,
    schedule: Schedule,
    *,
    steps_offset: int = 0,
    final: str = "zero",
    rho: float | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> torch.Tensor:
    """The explicit step array a sampler takes: n descending VE levels of `schedule`, then the final level.

    `kind` is one of SPACINGS: the grid kinds (leading, trailing, linspace, uniform, quad; see `spaced_timesteps`)
    pick grid indices; karras and exponential space n levels between sigma_min and sigma_max (default: the grid's
    ends; rho defaults to the schedule's, else 7). `final`: "zero" appends 0 (a clean sample), "min" appends
    sigma_min (the original DDIM's last level, alpha_bar_0), "none" appends nothing. float64, on the CPU.
    """
    if final not in FINALS:
        raise ValueError(f"final '{final}' unknown; expected one of {', '.join(FINALS)}")
    if kind in ("karras", "exponential"):
        lo = schedule.sigma_min if sigma_min is None else float(sigma_min)
        hi = schedule.sigma_max if sigma_max is None else float(sigma_max)
        if not 0 < lo < hi < math.inf:
            raise ValueError(f"{kind} spacing needs 0 < sigma_min < sigma_max < inf, got {lo:g}, {hi:g}"
                             + ("; this schedule ends in pure noise, pass sigma_max" if math.isinf(hi) else ""))
        if n < 1:
            raise ValueError(f"number of sampling steps must be at least 1, got {n}")
        rho = float(getattr(schedule, "rho", 7.0) if rho is None else rho)
        sigmas = karras_sigmas(n, lo, hi, rho) if kind == "karras" else exponential_sigmas(n, lo, hi)
    elif kind in GRID_SPACINGS:
        sigmas = schedule.t_to_sigma(spaced_timesteps(kind, n, schedule.num_timesteps, steps_offset))
    else:
        raise ValueError(f"spacing '{kind}' unknown; expected one of {', '.join(SPACINGS)}")
    tail = {"zero": [0.0], "min": [schedule.sigma_min], "none": []}[final]
    return torch.cat([sigmas, torch.tensor(tail, dtype=torch.float64)])
