"""The one denoiser builder: a network of any parameterization over any process, seen by samplers as
denoise(x, sigma) -> x0 on the VE-normalised latent x = x_t / alpha (the contract of `ldm.sampling.samplers`).

`Denoiser` scales the input to the process (x_t = alpha x, or x itself at an infinite level, where x holds the
pure noise), maps each level to the network's time input (the discrete timestep, c_noise or t * 1000), runs the
network once (guidance is folded into the network function by `guided_model_fn`, written once) and converts its
output to x0 through `ldm.sampling.parameterization`; `x0_fn` (see `x0_hook`) post-processes x0.
`model_denoiser` builds one from a diffusion model (apply_model, schedule, parameterization).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from ldm.sampling.guidance import Conditioning, guided_model_fn
from ldm.sampling.parameterization import check_parameterization, input_scale, to_x0
from ldm.sampling.schedule import Schedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
X0Fn = Callable[[torch.Tensor], torch.Tensor]


def norm_thresholding(x0: torch.Tensor, value: float) -> torch.Tensor:
    """Scale each sample's x0 down so that its RMS norm is at most `value` (the original dynamic_threshold)."""
    rms = x0.pow(2).flatten(1).mean(1).sqrt().clamp(min=value)
    return x0 * (value / rms).reshape(-1, *((1,) * (x0.ndim - 1)))


def x0_hook(clip: bool = False, quantize: X0Fn | None = None, dynamic_threshold: float | None = None) -> X0Fn | None:
    """The one x0 post-processing hook: `quantize` (e.g. a first stage's codebook), then the clamp to [-1, 1] (the
    original's clip_denoised), then norm thresholding (the original's dynamic_threshold), in the original's order;
    None when nothing is asked."""
    if not clip and quantize is None and dynamic_threshold is None:
        return None

    def fn(x0: torch.Tensor) -> torch.Tensor:
        if quantize is not None:
            x0 = quantize(x0)
        if clip:
            x0 = x0.clamp(-1, 1)
        return x0 if dynamic_threshold is None else norm_thresholding(x0, dynamic_threshold)

    return fn


def as_levels(sigma: torch.Tensor | float, batch: int) -> torch.Tensor:
    """One float64 CPU level per batch element from a scalar or a per-sample tensor."""
    sigma = torch.as_tensor(sigma).detach().to("cpu", torch.float64).reshape(-1)
    return sigma.expand(batch).clone() if sigma.numel() == 1 else sigma


class _Level(NamedTuple):
    """What a denoiser call at one set of levels needs, computed once per run (see `Denoiser.level`)."""

    scale: torch.Tensor  # x_t = x * scale
    net_scale: torch.Tensor | float  # network input = x_t * net_scale
    alpha: torch.Tensor
    sigma: torch.Tensor
    time: torch.Tensor  # the network's time input


class Denoiser:
    """denoise(x, sigma) -> x0 for `model_fn(network input, time) -> output` of a parameterization over a schedule.

    The network sees integer timesteps as a long tensor (as the original samplers passed them) and fractional
    ones as float32. `quantize_time` rounds discrete timesteps to the nearest (k-diffusion's `quantize`).
    A sampler asks for the same few levels over and over (each step's, once per model evaluation), so what depends
    on the levels only -- alpha, sigma, the network's time -- is computed once per level in float64 and kept, on
    x's device and in its dtype, for the rest of the run: a call costs the arithmetic on x and the network only.
    """

    _MAX_LEVELS = 4096  # kept levels; a long-lived denoiser forgets them all past this

    def __init__(self, model_fn: ModelFn, schedule: Schedule, parameterization: str = "eps",
                 x0_fn: X0Fn | None = None, quantize_time: bool = False):
        self.model_fn = model_fn
        self.schedule = schedule
        self.parameterization = check_parameterization(parameterization)
        self.x0_fn = x0_fn
        self.quantize_time = quantize_time
        self._levels: dict[tuple, _Level] = {}

    def time(self, sigma: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The network's time input at levels sigma (float64 CPU), on `device`."""
        t = self.schedule.model_time(sigma)
        if self.quantize_time:
            t = t.round()
        if bool((t == t.round()).all()):
            return t.to(device, torch.long)
        return t.to(device, torch.float32)

    def level(self, sigma: torch.Tensor | float, like: torch.Tensor) -> _Level:
        """The scalings and network time at VE levels sigma for inputs like `like` (kept per level, dtype, device)."""
        values = sigma.tolist() if isinstance(sigma, torch.Tensor) else sigma
        values = tuple(values) if isinstance(values, list) else (float(values),)
        key = (values, like.shape[0], like.ndim, like.dtype, like.device)
        cached = self._levels.get(key)
        if cached is None:
            if len(self._levels) >= self._MAX_LEVELS:
                self._levels.clear()
            cached = self._levels[key] = self._compute_level(as_levels(sigma, like.shape[0]), like)
        return cached

    def _compute_level(self, sigma: torch.Tensor, like: torch.Tensor) -> _Level:
        infinite = torch.isinf(sigma)
        if bool(infinite.any()) and self.parameterization in ("eps", "edm"):
            raise ValueError(f"a {self.parameterization}-prediction model cannot denoise pure noise (infinite level, "
                             "zero terminal SNR): use a v, x0 or flow model, or a finite sigma_max")
        alpha, sig = self.schedule.alpha_sigma(sigma)
        shape = (-1, *((1,) * (like.ndim - 1)))
        scale = torch.where(infinite, torch.ones_like(alpha), alpha).reshape(shape).to(like)
        alpha, sig = alpha.reshape(shape).to(like), sig.reshape(shape).to(like)
        net_scale = input_scale(self.parameterization, alpha, sig, self.schedule.sigma_data)
        return _Level(scale, net_scale, alpha, sig, self.time(sigma, like.device))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """The predicted clean sample for x at VE levels sigma (one per batch element, or one for all)."""
        level = self.level(sigma, x)
        x_t = x * level.scale
        net_in = x_t if isinstance(level.net_scale, float) and level.net_scale == 1.0 else x_t * level.net_scale
        out = self.model_fn(net_in, level.time).to(x.dtype)
        x0 = to_x0(self.parameterization, out, x_t, level.alpha, level.sigma, self.schedule.sigma_data)
        return x0 if self.x0_fn is None else self.x0_fn(x0)


def model_denoiser(
    model: Any,
    cond: Conditioning = None,
    uncond: Conditioning = None,
    scale: float = 1.0,
    rescale: float = 0.0,
    *,
    x0_fn: X0Fn | None = None,
    score_corrector: Any = None,
    corrector_kwargs: dict | None = None,
    scale_at: Mapping[int, float] | None = None,
) -> Denoiser:
    """The denoiser of a diffusion model (its `apply_model(x, t, cond)`, `schedule` and `parameterization`) with
    classifier-free guidance of `scale` (and guidance rescale `rescale`, Lin et al. 2023) against `uncond`.

    `score_corrector.modify_score(model, out, x_t, t, cond, **corrector_kwargs)` edits eps outputs (the original's
    score correction); `scale_at` maps an integer timestep to its own guidance scale (the original's ucg_schedule).
    """
    if score_corrector is not None and model.parameterization != "eps":
        raise ValueError(f"score_corrector needs an eps-parameterized model, this one predicts {model.parameterization}")
    fns: dict[float, ModelFn] = {}

    def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = scale if scale_at is None else scale_at[int(t[0])]
        if s not in fns:
            fns[s] = guided_model_fn(model.apply_model, cond, uncond, s, rescale)
        out = fns[s](x, t)
        if score_corrector is not None:
            out = score_corrector.modify_score(model, out, x, t, cond, **(corrector_kwargs or {}))
        return out

    return Denoiser(network, model.schedule, model.parameterization, x0_fn=x0_fn)
