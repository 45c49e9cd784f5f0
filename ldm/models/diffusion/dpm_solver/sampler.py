"""DPMSolverSampler with the original Stable Diffusion v2 API, a thin adapter over ldm.sampling.samplers.dpmpp_2m.

The original ran Lu et al.'s continuous-time DPM-Solver++(2M) with "time_uniform" steps between
t=1 and t=1/N, evaluating the network at fractional timesteps. Here the solver runs on the model's
discrete timesteps, spaced as diffusers' DPMSolverMultistepScheduler does by default ("linspace":
rounded, evenly spaced from T-1 down, t=0 left out) and ending on a clean sample; the two agree
closely but not bit for bit.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ldm.models.diffusion.ddim import (
    StepReporter,
    check_conditioning_batch,
    model_denoiser,
    noise_source,
    x0_postprocess,
)
from ldm.sampling.samplers import dpmpp_2m, linspace_timesteps

logger = logging.getLogger(__name__)


class DPMSolverSampler:
    """DPM-Solver++(2M) (Lu et al. 2022) for eps, x0 and v models, with classifier-free guidance."""

    def __init__(self, model: Any, **kwargs: Any):
        self.model = model
        self.alphas_cumprod = model.schedule.buffers()["alphas_cumprod"].to(model.device)

    def register_buffer(self, name: str, attr: Any) -> None:
        """Set an attribute, moving tensors to the model's device."""
        if isinstance(attr, torch.Tensor):
            attr = attr.to(self.model.device)
        setattr(self, name, attr)

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: Any = None,
               callback: Callable | None = None, normals_sequence: Any = None, img_callback: Callable | None = None,
               quantize_x0: bool = False, eta: float = 0.0, mask: torch.Tensor | None = None,
               x0: torch.Tensor | None = None, temperature: float = 1.0, noise_dropout: float = 0.0,
               score_corrector: Any = None, corrector_kwargs: dict | None = None, verbose: bool = True,
               x_T: torch.Tensor | None = None, log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, seeds: Sequence[int] | None = None,
               **kwargs: Any) -> tuple[torch.Tensor, None]:
        """Draw `batch_size` samples of `shape` with S solver steps; returns (samples, None) as the original.

        The solver is deterministic: `eta`, `temperature` and `noise_dropout` have no effect.
        `seeds` (not in the original): one int per sample; sample i's x_T and its inpainting noise
        come from a generator seeded with seeds[i], so it does not depend on the rest of the batch.
        """
        check_conditioning_batch(conditioning, batch_size)
        size = (batch_size, *shape)
        if verbose:
            logger.info("Data shape for DPM-Solver sampling is %s, sampling steps %d", size, S)
        noise = noise_source(seeds, batch_size, self.model.device)
        img = noise.randn(size) if x_T is None else x_T
        denoise = model_denoiser(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale,
                                 x0_fn=x0_postprocess(self.model, quantize_x0),
                                 score_corrector=score_corrector, corrector_kwargs=corrector_kwargs)
        steps = linspace_timesteps(S, self.model.num_timesteps)
        reporter = StepReporter(len(steps), "DPM-Solver++ Sampler", verbose, callback, img_callback, log_every_t, img)
        try:
            img = dpmpp_2m(denoise, self.model.schedule, steps, img, noise=noise, mask=mask, x0=x0, callback=reporter)
        finally:
            reporter.close()
        return img.to(self.model.device), None
