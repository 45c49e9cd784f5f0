"""PLMSSampler with the original LDM / Stable Diffusion API, a thin adapter over ldm.sampling.samplers.plms."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ldm.models.diffusion.ddim import X0Fn, ScheduledSampler, model_denoiser, x0_postprocess
from ldm.sampling.samplers import Denoise, plms, plms_step


class PLMSSampler(ScheduledSampler):
    """Pseudo linear multistep sampling (Liu et al. 2022, PNDM) on the DDIM timesteps; eta must be 0.

    `sample(...)` takes the arguments of DDIMSampler.sample, `seeds` included (they fix x_T and the
    inpainting noise per sample); temperature and noise_dropout have no effect, as in the original.
    """

    sampler_name = "PLMS"

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """As DDIMSampler.make_schedule; PLMS is deterministic, so ddim_eta must be 0."""
        if ddim_eta != 0:
            raise ValueError(f"ddim_eta must be 0 for PLMS (got eta={ddim_eta}); use DDIMSampler for eta > 0")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)

    plms_sampling = ScheduledSampler.sampling_loop

    def _run(self, denoise: Denoise, steps: np.ndarray, x: torch.Tensor, *, x0_fn: X0Fn | None,
             temperature: float, noise_dropout: float, **kwargs: Any) -> torch.Tensor:
        """PLMS; it injects no noise, so temperature and noise_dropout have no effect (as in the original)."""
        return plms(denoise, self.model.schedule, steps, x, x0_fn=x0_fn, **kwargs)

    @torch.no_grad()
    def p_sample_plms(self, x: torch.Tensor, c: Any, t: torch.Tensor, index: int, repeat_noise: bool = False,
                      use_original_steps: bool = False, quantize_denoised: bool = False, temperature: float = 1.0,
                      noise_dropout: float = 0.0, score_corrector: Any = None, corrector_kwargs: dict | None = None,
                      unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
                      old_eps: list[torch.Tensor] | None = None,
                      t_next: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One PLMS step at timestep t (schedule position `index`); returns (x_prev, pred_x0, e_t)."""
        denoise = model_denoiser(self.model, c, unconditional_conditioning, unconditional_guidance_scale,
                                 score_corrector=score_corrector, corrector_kwargs=corrector_kwargs)
        schedule = self.model.schedule
        if use_original_steps:
            a_t, a_prev = float(schedule.alphas_cumprod[index]), float(schedule.alphas_cumprod_prev[index])
        else:
            a_t, a_prev = float(self.ddim_alphas[index]), float(self.ddim_alphas_prev[index])
        t_int = int(t.reshape(-1)[0])
        t_next_int = t_int if t_next is None else int(t_next.reshape(-1)[0])
        history = list(old_eps or [])[-3:]
        return plms_step(denoise, x, t_int, t_next_int, a_t, a_prev, history,
                         x0_postprocess(self.model, quantize_denoised))
