"""DDIMSampler with the original LDM / Stable Diffusion API, a thin adapter over `ldm.sampling.samplers.ddim`.

The class runs the registered "ddim" sampler through `ldm.models.diffusion.sampler.Sampler` (one denoiser builder:
guidance, eps/x0/v/flow conversion, the x0 hook) and keeps the schedule buffers the original registered
(`ddim_timesteps`, `ddim_alphas`, ...) and its single-step, img2img and inversion methods.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ldm.models.diffusion.sampler import (  # noqa: F401  (StepReporter and the checks: importable from here as before)
    Sampler,
    StepReporter,
    check_conditioning_batch,
    model_x0_hook,
    noise_source,
)
from ldm.modules.diffusionmodules.util import extract_into_tensor, noise_like
from ldm.sampling.denoiser import model_denoiser
from ldm.sampling.noise import GlobalNoise
from ldm.sampling.samplers.base import to_d
from ldm.sampling.samplers.ddim import ddim, ddim_inversion
from ldm.sampling.schedule import GRID_SPACINGS, NoiseSchedule, spaced_timesteps

logger = logging.getLogger(__name__)

VP_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
              "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod")


class ScheduledSampler(Sampler):
    """What DDIMSampler and PLMSSampler share: the original constructor, buffers, make_schedule and sampling loop."""

    def __init__(self, model: Any, schedule: str = "linear", *, spacing: str | None = None, final: str | None = None,
                 **kwargs: Any):
        super().__init__(model, spacing=spacing, final=final)
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule  # the original's (unused) name of the schedule
        self.ddim_eta = 0.0

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str | None = None, ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Choose the sampling levels (`ddim_discretize`, default the sampler's spacing: the original "uniform") and
        register the schedule buffers of the original sampler (ddim_timesteps, ddim_alphas, ddim_sigmas, ...)."""
        T, noise_schedule = self.ddpm_num_timesteps, self.model.schedule
        kind = ddim_discretize or self.spacing
        if kind == "uniform" and not 1 <= ddim_num_steps <= T // 2:
            raise ValueError(f"ddim_num_steps must lie in [1, {T // 2}] for {T} training timesteps, got {ddim_num_steps}")
        if noise_schedule.num_timesteps != T:
            raise ValueError(f"the model's schedule has {noise_schedule.num_timesteps} timesteps, num_timesteps is {T}")
        self.spacing = kind
        sigmas = self.make_sigmas(ddim_num_steps)
        self.sigmas = sigmas
        steps = spaced_timesteps(kind, ddim_num_steps, T, self.steps_offset) if kind in GRID_SPACINGS else \
            noise_schedule.sigma_to_t(sigmas[:-1]).numpy()
        self.ddim_timesteps = np.ascontiguousarray(steps[::-1])
        if isinstance(noise_schedule, NoiseSchedule):
            buffers = noise_schedule.buffers()
            for name in VP_BUFFERS:
                self.register_buffer(name, buffers[name])
        alpha, _ = noise_schedule.alpha_sigma(sigmas.flip(0))
        alphas = (alpha[1:] ** 2).numpy()  # alpha_bar at the sampling timesteps, ascending
        alphas_prev = np.asarray([float(alpha[0]) ** 2] + alphas[:-1].tolist())
        ddim_sigmas = ddim_eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
        self.register_buffer("ddim_sigmas", torch.as_tensor(ddim_sigmas, dtype=torch.float32))
        self.register_buffer("ddim_alphas", torch.as_tensor(alphas, dtype=torch.float32))
        self.register_buffer("ddim_alphas_prev", alphas_prev)  # numpy, as in the original
        self.register_buffer("ddim_sqrt_one_minus_alphas", torch.as_tensor(np.sqrt(1.0 - alphas), dtype=torch.float32))
        if isinstance(noise_schedule, NoiseSchedule):
            a, a_prev = noise_schedule.alphas_cumprod, noise_schedule.alphas_cumprod_prev
            original_sigmas = ddim_eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
            self.register_buffer("ddim_sigmas_for_original_num_steps", original_sigmas.float())
        self.ddim_eta = ddim_eta
        if verbose:
            logger.info("Selected timesteps for %s sampler: %s", self.title, self.ddim_timesteps)
            logger.info("Selected alphas: a_t %s; a_(t-1) %s", alphas, alphas_prev)

    def prepare(self, S: int, eta: float, verbose: bool) -> None:
        """make_schedule(S, eta), as the original sample() does."""
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)

    def _levels(self, use_original_steps: bool, timesteps: int | None = None) -> torch.Tensor:
        """The levels to run (the original's `timesteps` count): all training timesteps down to a clean sample, or
        the sampler's, of which the original keeps one fewer than the fraction asked for."""
        schedule = self.model.schedule
        if use_original_steps:
            count = self.ddpm_num_timesteps if timesteps is None else timesteps
            return torch.cat([schedule.t_to_sigma(torch.arange(count - 1, -1, -1)), torch.zeros(1, dtype=torch.float64)])
        if timesteps is None:
            return self.sigmas
        keep = int(min(timesteps / len(self.ddim_timesteps), 1) * len(self.ddim_timesteps)) - 1
        return torch.cat([self.sigmas[len(self.sigmas) - 1 - keep:-1], self.sigmas[-1:]])

    @torch.no_grad()
    def sampling_loop(self, cond: Any, shape: Sequence[int], x_T: torch.Tensor | None = None,
                      ddim_use_original_steps: bool = False, callback: Callable | None = None,
                      timesteps: int | None = None, quantize_denoised: bool = False, mask: torch.Tensor | None = None,
                      x0: torch.Tensor | None = None, img_callback: Callable | None = None, log_every_t: int = 100,
                      temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector: Any = None,
                      corrector_kwargs: dict | None = None, unconditional_guidance_scale: float = 1.0,
                      unconditional_conditioning: Any = None, dynamic_threshold: float | None = None,
                      ucg_schedule: Sequence[float] | None = None, noise_source: Any = None,
                      verbose: bool = True, guidance_rescale: float = 0.0) -> tuple[torch.Tensor, dict[str, list]]:
        """The sampling loop on a prepared schedule (the original's ddim_sampling / plms_sampling); `noise_source`,
        `verbose` and `guidance_rescale` are additions."""
        return self.run(
            cond, shape, self._levels(ddim_use_original_steps, timesteps), x_T=x_T, noise=noise_source,
            callback=callback, img_callback=img_callback,
            x0_fn=model_x0_hook(self.model, quantize_denoised, dynamic_threshold), mask=mask, x0=x0,
            log_every_t=log_every_t, score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
            scale=unconditional_guidance_scale, uncond=unconditional_conditioning, ucg_schedule=ucg_schedule,
            rescale=guidance_rescale, options=self.sampler_options(self.ddim_eta, temperature, noise_dropout),
            verbose=verbose)

    def _step_levels(self, t: torch.Tensor, index: int, use_original_steps: bool) -> tuple[float, float]:
        """(sigma, sigma_prev) of one original single step at timestep t, schedule position `index`."""
        schedule = self.model.schedule
        sigma = float(schedule.t_to_sigma(float(t.reshape(-1)[0])))
        a_prev = float(schedule.alphas_cumprod_prev[index]) if use_original_steps else float(self.ddim_alphas_prev[index])
        return sigma, math.sqrt((1 - a_prev) / a_prev)


class DDIMSampler(ScheduledSampler):
    """Sampling, img2img (stochastic_encode + decode) and inversion (encode) with DDIM (Song et al. 2021)."""

    name, title = "ddim", "DDIM"
    ddim_sampling = ScheduledSampler.sampling_loop

    @torch.no_grad()
    def p_sample_ddim(self, x: torch.Tensor, c: Any, t: torch.Tensor, index: int, repeat_noise: bool = False,
                      use_original_steps: bool = False, quantize_denoised: bool = False, temperature: float = 1.0,
                      noise_dropout: float = 0.0, score_corrector: Any = None, corrector_kwargs: dict | None = None,
                      unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
                      dynamic_threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step at timestep t (schedule position `index`); returns (x_prev, pred_x0)."""
        denoise = model_denoiser(self.model, c, unconditional_conditioning, unconditional_guidance_scale,
                                 x0_fn=model_x0_hook(self.model, quantize_denoised, dynamic_threshold),
                                 score_corrector=score_corrector, corrector_kwargs=corrector_kwargs)
        sigma, sigma_prev = self._step_levels(t, index, use_original_steps)
        schedule = self.model.schedule
        x_ve = schedule.to_ve(x, sigma)
        pred_x0 = denoise(x_ve, sigma)
        up = float(self.ddim_sigmas_for_original_num_steps[index] if use_original_steps else self.ddim_sigmas[index])
        up = up * math.sqrt(1 + sigma_prev**2)  # the original sigma_t, in VE units at the previous level
        x_prev = pred_x0 + math.sqrt(max(0.0, sigma_prev**2 - up**2)) * to_d(x_ve, sigma, pred_x0)
        if up > 0:
            z = noise_like(x.shape, x.device, repeat_noise) * temperature
            x_prev = x_prev + up * (F.dropout(z, p=noise_dropout) if noise_dropout > 0 else z)
        return schedule.from_ve(x_prev, sigma_prev), pred_x0

    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t: torch.Tensor, use_original_steps: bool = False,
                          noise: torch.Tensor | None = None) -> torch.Tensor:
        """Noise x0 to schedule position t (a DDIM step index, or a timestep with use_original_steps)."""
        if use_original_steps:
            sqrt_a, sqrt_one_minus_a = self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod
        else:
            sqrt_a, sqrt_one_minus_a = self.ddim_alphas.sqrt(), self.ddim_sqrt_one_minus_alphas
        noise = torch.randn_like(x0) if noise is None else noise
        t = t.to(sqrt_a.device)
        return (extract_into_tensor(sqrt_a, t, x0.shape).to(x0) * x0
                + extract_into_tensor(sqrt_one_minus_a, t, x0.shape).to(x0) * noise)

    def _decode_levels(self, t_start: int, use_original_steps: bool) -> torch.Tensor:
        """The levels of the first t_start steps, from the t_start-th down to the sampler's last level."""
        schedule = self.model.schedule
        if use_original_steps:
            return torch.cat([schedule.t_to_sigma(torch.arange(t_start - 1, -1, -1)), torch.zeros(1, dtype=torch.float64)])
        return torch.cat([self.sigmas[len(self.sigmas) - 1 - t_start:-1], self.sigmas[-1:]])

    @torch.no_grad()
    def decode(self, x_latent: torch.Tensor, cond: Any, t_start: int, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, use_original_steps: bool = False,
               callback: Callable | None = None, guidance_rescale: float = 0.0) -> torch.Tensor:
        """Denoise a latent noised with stochastic_encode(..., t_start - 1) over the first t_start steps (img2img);
        `guidance_rescale` (not in the original) as in sample()."""
        if t_start <= 0:
            return x_latent
        levels = self._decode_levels(t_start, use_original_steps)
        samples, _ = self.run(cond, x_latent.shape, levels, x_T=x_latent, noise=GlobalNoise(x_latent.device),
                              callback=callback, scale=unconditional_guidance_scale, uncond=unconditional_conditioning,
                              rescale=guidance_rescale, options=self.sampler_options(self.ddim_eta),
                              desc="Decoding image")
        return samples

    @torch.no_grad()
    def encode(self, x0: torch.Tensor, c: Any, t_enc: int, use_original_steps: bool = False,
               return_intermediates: int | None = None, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None,
               callback: Callable | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """DDIM inversion of x0 over the first t_enc steps; returns (x_encoded, info) as the original.

        Unlike the original (which evaluated the model at the step index i), each step evaluates the model at the
        timestep it moves to, so that `decode(x_encoded, c, t_enc)` undoes it.
        """
        num_reference = self.ddpm_num_timesteps if use_original_steps else len(self.ddim_timesteps)
        if not 0 <= t_enc <= num_reference:
            raise ValueError(f"t_enc must lie in [0, {num_reference}], got {t_enc}")
        out: dict[str, Any] = {"x_encoded": x0, "intermediate_steps": []}
        intermediates: list[torch.Tensor] = []
        every = max(1, t_enc // return_intermediates) if return_intermediates else 0
        schedule = self.model.schedule

        def report(step: dict[str, Any]) -> None:
            i = step["i"]
            if return_intermediates and ((i % every == 0 and i < t_enc - 1) or i >= t_enc - 2):
                intermediates.append(schedule.from_ve(step["x"], step["sigma_next"]))
                out["intermediate_steps"].append(i)
            if callback is not None:
                callback(i)

        x = x0
        if t_enc > 0:
            levels = self._decode_levels(t_enc, use_original_steps).flip(0)
            denoise = model_denoiser(self.model, c, unconditional_conditioning, unconditional_guidance_scale)
            x = ddim_inversion(denoise, levels, schedule.to_ve(x0, float(levels[0])), schedule=schedule,
                               callback=report)
            x = schedule.from_ve(x, float(levels[-1]))
        out["x_encoded"] = x
        if return_intermediates:
            out["intermediates"] = intermediates
        return x, out


__all__ = ["DDIMSampler", "ScheduledSampler", "ddim"]
