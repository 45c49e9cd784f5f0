"""DDIMSampler with the original LDM / Stable Diffusion API, as a thin adapter over ldm.sampling.

The class builds a denoiser from the model (classifier-free guidance, eps/x0/v conversion, x0
post-processing) and runs `ldm.sampling.samplers.ddim`; the schedule buffers the original
registered (`ddim_timesteps`, `ddim_alphas`, ...) are kept for scripts that read them.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ldm.modules.diffusionmodules.util import (
    extract_into_tensor,
    make_ddim_sampling_parameters,
    make_ddim_timesteps,
    noise_like,
)
from ldm.sampling.denoiser import Denoiser
from ldm.sampling.guidance import guided_model_fn
from ldm.sampling.noise import GlobalNoise, make_noise
from ldm.sampling.parameterization import Prediction
from ldm.sampling.samplers import Denoise, NoiseSource, ddim, ddim_inversion, ddim_step

logger = logging.getLogger(__name__)

X0Fn = Callable[[torch.Tensor], torch.Tensor]


def norm_thresholding(x0: torch.Tensor, value: float) -> torch.Tensor:
    """Scale each sample's x0 down so that its RMS norm is at most `value` (the original dynamic_threshold)."""
    rms = x0.pow(2).flatten(1).mean(1).sqrt().clamp(min=value)
    return x0 * (value / rms).reshape(-1, *((1,) * (x0.ndim - 1)))


def x0_postprocess(model: Any, quantize_x0: bool = False, dynamic_threshold: float | None = None) -> X0Fn | None:
    """The original's optional x0 edits: codebook quantization by the first stage, then norm thresholding."""
    if not quantize_x0 and dynamic_threshold is None:
        return None

    def fn(x0: torch.Tensor) -> torch.Tensor:
        if quantize_x0:
            x0 = model.first_stage_model.quantize(x0)[0]
        return x0 if dynamic_threshold is None else norm_thresholding(x0, dynamic_threshold)

    return fn


def model_denoiser(
    model: Any,
    cond: Any,
    uncond: Any = None,
    scale: float = 1.0,
    *,
    x0_fn: X0Fn | None = None,
    score_corrector: Any = None,
    corrector_kwargs: dict | None = None,
    scale_at: dict[int, float] | None = None,
) -> Denoise:
    """Denoise function of a diffusion model: guidance, optional score correction, eps/x0/v conversion.

    `x0_fn` edits the predicted x0 only and leaves eps as predicted (as the original samplers do);
    `scale_at` maps a timestep to its own guidance scale (the original's `ucg_schedule`).
    """
    fns: dict[float, Callable] = {}

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = scale if scale_at is None else scale_at[int(t[0])]
        if s not in fns:
            fns[s] = guided_model_fn(model.apply_model, cond, uncond, s)
        out = fns[s](x, t)
        if score_corrector is not None:
            out = score_corrector.modify_score(model, out, x, t, cond, **(corrector_kwargs or {}))
        return out

    if score_corrector is not None and model.parameterization != "eps":
        raise ValueError(f"score_corrector needs an eps-parameterized model, this one predicts {model.parameterization}")
    return with_x0_fn(Denoiser(guided, model.schedule, model.parameterization), x0_fn)


def with_x0_fn(denoise: Denoise, x0_fn: X0Fn | None) -> Denoise:
    """Apply x0_fn to the predicted x0, keeping the predicted eps (the original's quantize / threshold)."""
    if x0_fn is None:
        return denoise

    def edited(x: torch.Tensor, t: torch.Tensor) -> Prediction:
        pred = denoise(x, t)
        return Prediction(x0_fn(pred.x0), pred.eps)

    return edited


def check_conditioning_batch(conditioning: Any, batch_size: int) -> None:
    """Warn, as the original samplers do, when the conditioning's batch differs from batch_size."""
    if conditioning is None:
        return
    first = conditioning
    if isinstance(first, dict):
        first = first[next(iter(first))]
    while isinstance(first, (list, tuple)):
        first = first[0]
    if getattr(first, "shape", None) is not None and first.shape[0] != batch_size:
        warnings.warn(f"Got {first.shape[0]} conditionings but batch_size is {batch_size}; "
                      "pass one conditioning per sample", stacklevel=3)


def noise_source(seeds: Sequence[int] | None, batch_size: int, device: torch.device) -> NoiseSource:
    """Per-sample seeded noise when `seeds` is given (one per sample), else the global generator."""
    if seeds is not None and len(seeds) != batch_size:
        raise ValueError(f"seeds must hold one seed per sample: got {len(seeds)} seeds for batch_size {batch_size}")
    return make_noise(seeds, device)


class StepReporter:
    """Turns the samplers' step dicts into the original callback(i), img_callback(pred_x0, i), a tqdm
    bar and the intermediates {"x_inter": [...], "pred_x0": [...]} logged every log_every_t steps."""

    def __init__(self, total: int, desc: str, verbose: bool = True, callback: Callable | None = None,
                 img_callback: Callable | None = None, log_every_t: int = 100, x_T: torch.Tensor | None = None):
        self.total, self.callback, self.img_callback, self.log_every_t = total, callback, img_callback, log_every_t
        self.intermediates = {"x_inter": [x_T], "pred_x0": [x_T]}
        self.bar = tqdm(total=total, desc=desc, disable=not verbose)

    def __call__(self, step: dict[str, Any]) -> None:
        """Report one finished step."""
        i = step["i"]
        self.bar.update(1)
        if self.callback is not None:
            self.callback(i)
        if self.img_callback is not None:
            self.img_callback(step["x0"], i)
        index = self.total - i - 1
        if index % self.log_every_t == 0 or index == self.total - 1:
            self.intermediates["x_inter"].append(step["x"])
            self.intermediates["pred_x0"].append(step["x0"])

    def close(self) -> None:
        """Close the progress bar."""
        self.bar.close()


class ScheduledSampler:
    """What DDIMSampler and PLMSSampler share: the original constructor, buffers and make_schedule."""

    sampler_name = "DDIM"

    def __init__(self, model: Any, schedule: str = "linear", **kwargs: Any):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        self.ddim_eta = 0.0

    def register_buffer(self, name: str, attr: Any) -> None:
        """Set an attribute, moving tensors to the model's device."""
        if isinstance(attr, torch.Tensor):
            attr = attr.to(self.model.device)
        setattr(self, name, attr)

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Choose the DDIM timesteps and register the schedule buffers of the original sampler."""
        T = self.ddpm_num_timesteps
        if ddim_discretize == "uniform" and not 1 <= ddim_num_steps <= T // 2:
            raise ValueError(f"ddim_num_steps must lie in [1, {T // 2}] for {T} training timesteps, got {ddim_num_steps}")
        self.ddim_timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, T, verbose=verbose)
        if self.ddim_timesteps.max() >= T:  # uniform spacing, shifted by one, can overshoot (e.g. 3 of 1000)
            raise ValueError(f"ddim_num_steps={ddim_num_steps} with '{ddim_discretize}' spacing reaches timestep "
                             f"{self.ddim_timesteps.max()} of {T}; choose another number of steps")
        noise_schedule = self.model.schedule
        if noise_schedule.num_timesteps != T:
            raise ValueError(f"the model's schedule has {noise_schedule.num_timesteps} timesteps, num_timesteps is {T}")
        buffers = noise_schedule.buffers()
        for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                     "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"):
            self.register_buffer(name, buffers[name])
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(
            noise_schedule.alphas_cumprod.numpy(), self.ddim_timesteps, ddim_eta, verbose=verbose)
        self.register_buffer("ddim_sigmas", torch.as_tensor(sigmas, dtype=torch.float32))
        self.register_buffer("ddim_alphas", torch.as_tensor(alphas, dtype=torch.float32))
        self.register_buffer("ddim_alphas_prev", alphas_prev)  # numpy, as in the original
        self.register_buffer("ddim_sqrt_one_minus_alphas", torch.as_tensor(np.sqrt(1.0 - alphas), dtype=torch.float32))
        a, a_prev = noise_schedule.alphas_cumprod, noise_schedule.alphas_cumprod_prev
        original_sigmas = ddim_eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        self.register_buffer("ddim_sigmas_for_original_num_steps", original_sigmas.float())
        self.ddim_eta = ddim_eta
        if verbose:
            logger.info("Selected timesteps for %s sampler: %s", self.sampler_name, self.ddim_timesteps)
            logger.info("Selected alphas: a_t %s; a_(t-1) %s", alphas, alphas_prev)

    def _timesteps(self, use_original_steps: bool, timesteps: int | None = None) -> tuple[np.ndarray, float]:
        """Decreasing timesteps to run and the level after the last one (the original's `timesteps` count)."""
        if use_original_steps:
            count = self.ddpm_num_timesteps if timesteps is None else timesteps
            return np.arange(count)[::-1], 1.0
        steps = self.ddim_timesteps
        if timesteps is not None:  # the original keeps one step fewer than the fraction asked for
            steps = steps[:int(min(timesteps / len(steps), 1) * len(steps)) - 1]
        return np.flip(steps), float(self.model.schedule.alphas_cumprod[0])

    @staticmethod
    def _scale_at(ucg_schedule: Sequence[float] | None, steps: np.ndarray) -> dict[int, float] | None:
        """The original's ucg_schedule (one guidance scale per step) keyed by timestep."""
        if ucg_schedule is None:
            return None
        if len(ucg_schedule) != len(steps):
            raise ValueError(f"ucg_schedule has {len(ucg_schedule)} scales for {len(steps)} sampling steps")
        return dict(zip(steps.tolist(), ucg_schedule))

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: Any = None,
               callback: Callable | None = None, normals_sequence: Any = None, img_callback: Callable | None = None,
               quantize_x0: bool = False, eta: float = 0.0, mask: torch.Tensor | None = None,
               x0: torch.Tensor | None = None, temperature: float = 1.0, noise_dropout: float = 0.0,
               score_corrector: Any = None, corrector_kwargs: dict | None = None, verbose: bool = True,
               x_T: torch.Tensor | None = None, log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, dynamic_threshold: float | None = None,
               ucg_schedule: Sequence[float] | None = None, seeds: Sequence[int] | None = None,
               **kwargs: Any) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Draw `batch_size` samples of `shape` with S steps; returns (samples, intermediates).

        `intermediates` = {"x_inter": [...], "pred_x0": [...]}: x_T, then every log_every_t steps
        and the last step. `seeds` (not in the original): one int per sample. Sample i then takes
        its x_T and every later random draw (eta > 0 noise, inpainting noise) from its own
        generator seeded with seeds[i], so it is the same whether drawn alone or in a batch.
        """
        check_conditioning_batch(conditioning, batch_size)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        size = (batch_size, *shape)
        if verbose:
            logger.info("Data shape for %s sampling is %s, eta %s", self.sampler_name, size, eta)
        return self.sampling_loop(
            conditioning, size, x_T=x_T, callback=callback, img_callback=img_callback,
            quantize_denoised=quantize_x0, mask=mask, x0=x0, log_every_t=log_every_t, temperature=temperature,
            noise_dropout=noise_dropout, score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
            unconditional_guidance_scale=unconditional_guidance_scale,
            unconditional_conditioning=unconditional_conditioning, dynamic_threshold=dynamic_threshold,
            ucg_schedule=ucg_schedule, noise_source=noise_source(seeds, batch_size, self.model.device),
            verbose=verbose)

    @torch.no_grad()
    def sampling_loop(self, cond: Any, shape: Sequence[int], x_T: torch.Tensor | None = None,
                      ddim_use_original_steps: bool = False, callback: Callable | None = None,
                      timesteps: int | None = None, quantize_denoised: bool = False, mask: torch.Tensor | None = None,
                      x0: torch.Tensor | None = None, img_callback: Callable | None = None, log_every_t: int = 100,
                      temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector: Any = None,
                      corrector_kwargs: dict | None = None, unconditional_guidance_scale: float = 1.0,
                      unconditional_conditioning: Any = None, dynamic_threshold: float | None = None,
                      ucg_schedule: Sequence[float] | None = None, noise_source: NoiseSource | None = None,
                      verbose: bool = True) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """The sampling loop on a prepared schedule (the original's ddim_sampling / plms_sampling).

        `noise_source` and `verbose` are additions: the per-sample noise of `sample(seeds=...)` and
        whether to show the progress bar.
        """
        noise = GlobalNoise(self.model.device) if noise_source is None else noise_source
        img = noise.randn(shape) if x_T is None else x_T
        steps, final = self._timesteps(ddim_use_original_steps, timesteps)
        denoise = model_denoiser(self.model, cond, unconditional_conditioning, unconditional_guidance_scale,
                                 score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
                                 scale_at=self._scale_at(ucg_schedule, steps))
        logger.info("Running %s Sampling with %d timesteps", self.sampler_name, len(steps))
        reporter = StepReporter(len(steps), f"{self.sampler_name} Sampler", verbose, callback, img_callback,
                                log_every_t, img)
        try:
            img = self._run(denoise, steps, img, final_alpha_bar=final,
                            x0_fn=x0_postprocess(self.model, quantize_denoised, dynamic_threshold),
                            temperature=temperature, noise_dropout=noise_dropout, noise=noise, mask=mask, x0=x0,
                            callback=reporter)
        finally:
            reporter.close()
        return img, reporter.intermediates

    def _run(self, denoise: Denoise, steps: np.ndarray, x: torch.Tensor, *, x0_fn: X0Fn | None,
             temperature: float, noise_dropout: float, **kwargs: Any) -> torch.Tensor:
        """Run this class's sampler function (see ldm.sampling.samplers)."""
        raise NotImplementedError


class DDIMSampler(ScheduledSampler):
    """Sampling, img2img (stochastic_encode + decode) and inversion (encode) with DDIM (Song et al. 2021)."""

    ddim_sampling = ScheduledSampler.sampling_loop

    def _run(self, denoise: Denoise, steps: np.ndarray, x: torch.Tensor, *, x0_fn: X0Fn | None,
             temperature: float, noise_dropout: float, **kwargs: Any) -> torch.Tensor:
        """DDIM with the eta of make_schedule; x0 edits change x0 only, as in the original."""
        return ddim(with_x0_fn(denoise, x0_fn), self.model.schedule, steps, x, eta=self.ddim_eta,
                    temperature=temperature, noise_dropout=noise_dropout, **kwargs)

    @torch.no_grad()
    def p_sample_ddim(self, x: torch.Tensor, c: Any, t: torch.Tensor, index: int, repeat_noise: bool = False,
                      use_original_steps: bool = False, quantize_denoised: bool = False, temperature: float = 1.0,
                      noise_dropout: float = 0.0, score_corrector: Any = None, corrector_kwargs: dict | None = None,
                      unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
                      dynamic_threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step at timestep t (schedule position `index`); returns (x_prev, pred_x0)."""
        denoise = model_denoiser(
            self.model, c, unconditional_conditioning, unconditional_guidance_scale,
            x0_fn=x0_postprocess(self.model, quantize_denoised, dynamic_threshold),
            score_corrector=score_corrector, corrector_kwargs=corrector_kwargs)
        pred = denoise(x, t)
        if use_original_steps:
            a_prev = float(self.model.schedule.alphas_cumprod_prev[index])
            sigma = float(self.ddim_sigmas_for_original_num_steps[index])
        else:
            a_prev, sigma = float(self.ddim_alphas_prev[index]), float(self.ddim_sigmas[index])
        z = None
        if sigma > 0:
            z = noise_like(x.shape, x.device, repeat_noise) * temperature
            z = F.dropout(z, p=noise_dropout) if noise_dropout > 0 else z
        return ddim_step(pred, a_prev, sigma, z), pred.x0

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

    @torch.no_grad()
    def decode(self, x_latent: torch.Tensor, cond: Any, t_start: int, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, use_original_steps: bool = False,
               callback: Callable | None = None) -> torch.Tensor:
        """Denoise a latent noised with stochastic_encode(..., t_start - 1) over the first t_start steps (img2img)."""
        all_steps = np.arange(self.ddpm_num_timesteps) if use_original_steps else self.ddim_timesteps
        steps = np.flip(all_steps[:t_start])
        if len(steps) == 0:
            return x_latent
        final = 1.0 if use_original_steps else float(self.model.schedule.alphas_cumprod[0])
        denoise = model_denoiser(self.model, cond, unconditional_conditioning, unconditional_guidance_scale)
        reporter = StepReporter(len(steps), "Decoding image", True, callback)
        try:
            return ddim(denoise, self.model.schedule, steps, x_latent, eta=self.ddim_eta, final_alpha_bar=final,
                        noise=GlobalNoise(x_latent.device), callback=reporter)
        finally:
            reporter.close()

    @torch.no_grad()
    def encode(self, x0: torch.Tensor, c: Any, t_enc: int, use_original_steps: bool = False,
               return_intermediates: int | None = None, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None,
               callback: Callable | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """DDIM inversion of x0 over the first t_enc steps; returns (x_encoded, info) as the original.

        Unlike the original (which evaluated the model at the step index i), each step evaluates the
        model at the timestep it moves to, so that `decode(x_encoded, c, t_enc)` undoes it.
        """
        num_reference = self.ddpm_num_timesteps if use_original_steps else len(self.ddim_timesteps)
        if not 0 <= t_enc <= num_reference:
            raise ValueError(f"t_enc must lie in [0, {num_reference}], got {t_enc}")
        steps = np.arange(t_enc) if use_original_steps else self.ddim_timesteps[:t_enc]
        initial = 1.0 if use_original_steps else float(self.model.schedule.alphas_cumprod[0])
        out: dict[str, Any] = {"x_encoded": x0, "intermediate_steps": []}
        intermediates: list[torch.Tensor] = []
        every = max(1, t_enc // return_intermediates) if return_intermediates else 0

        def report(step: dict[str, Any]) -> None:
            i = step["i"]
            if return_intermediates and ((i % every == 0 and i < t_enc - 1) or i >= t_enc - 2):
                intermediates.append(step["x"])
                out["intermediate_steps"].append(i)
            if callback is not None:
                callback(i)

        x = x0
        if t_enc > 0:
            denoise = model_denoiser(self.model, c, unconditional_conditioning, unconditional_guidance_scale)
            x = ddim_inversion(denoise, self.model.schedule, steps, x0, initial_alpha_bar=initial, callback=report)
        out["x_encoded"] = x
        if return_intermediates:
            out["intermediates"] = intermediates
        return x, out
