"""PLMSSampler with the original LDM / Stable Diffusion API, a thin adapter over ldm.sampling.samplers.plms."""
from __future__ import annotations

from typing import Any

import torch

from ldm.models.diffusion.ddim import ScheduledSampler
from ldm.models.diffusion.sampler import model_x0_hook
from ldm.sampling.denoiser import model_denoiser
from ldm.sampling.samplers.plms import plms_step


class PLMSSampler(ScheduledSampler):
    """Pseudo linear multistep sampling (Liu et al. 2022, PNDM) on the DDIM timesteps; eta must be 0.

    `sample(...)` takes the arguments of DDIMSampler.sample, `seeds` included (they fix x_T and the inpainting
    noise per sample); temperature and noise_dropout do not change the result, as in the original (whose zero noise
    still goes through F.dropout: on the global generator its mask is drawn all the same, so the next draws agree).
    """

    name, title = "plms", "PLMS"

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str | None = None, ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """As DDIMSampler.make_schedule; PLMS is deterministic, so ddim_eta must be 0."""
        if ddim_eta != 0:
            raise ValueError(f"ddim_eta must be 0 for PLMS (got eta={ddim_eta}); use DDIMSampler for eta > 0")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)

    plms_sampling = ScheduledSampler.sampling_loop

    @torch.no_grad()
    def p_sample_plms(self, x: torch.Tensor, c: Any, t: torch.Tensor, index: int, repeat_noise: bool = False,
                      use_original_steps: bool = False, quantize_denoised: bool = False, temperature: float = 1.0,
                      noise_dropout: float = 0.0, score_corrector: Any = None, corrector_kwargs: dict | None = None,
                      unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
                      old_eps: list[torch.Tensor] | None = None,
                      t_next: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One PLMS step at timestep t (schedule position `index`); returns (x_prev, pred_x0, e_t). The pseudo
        improved Euler step of an empty history evaluates at the level it moves to (`t_next` in the original)."""
        denoise = model_denoiser(self.model, c, unconditional_conditioning, unconditional_guidance_scale,
                                 x0_fn=model_x0_hook(self.model, quantize_denoised),
                                 score_corrector=score_corrector, corrector_kwargs=corrector_kwargs)
        sigma, sigma_prev = self._step_levels(t, index, use_original_steps)
        schedule = self.model.schedule
        x_prev, pred_x0, e_t = plms_step(denoise, schedule.to_ve(x, sigma), sigma, sigma_prev, list(old_eps or [])[-3:])
        return schedule.from_ve(x_prev, sigma_prev), pred_x0, e_t
