"""DPMSolverSampler with the original Stable Diffusion v2 API, a thin adapter over ldm.sampling.samplers.dpmpp_2m.

The original ran Lu et al.'s continuous-time DPM-Solver++(2M) with "time_uniform" steps between t=1 and t=1/N,
evaluating the network at fractional timesteps. Here the solver runs on the model's discrete timesteps, spaced as
diffusers' DPMSolverMultistepScheduler does by default (`dpm_solver_timesteps`) and ending on a clean sample; the
two agree closely but not bit for bit. `spacing=` (e.g. "karras") chooses another ladder.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ldm.models.diffusion.sampler import Sampler
from ldm.sampling.schedule import dpm_solver_timesteps


class DPMSolverSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022) for eps, x0, v and flow models, with classifier-free guidance."""

    name, title = "dpmpp_2m", "DPM-Solver++"

    def __init__(self, model: Any, *, spacing: str | None = None, final: str | None = None, **kwargs: Any):
        super().__init__(model, spacing=spacing, final=final)
        self.default_spacing = spacing is None
        self.alphas_cumprod = model.schedule.buffers().get("alphas_cumprod")
        if self.alphas_cumprod is not None:
            self.alphas_cumprod = self.alphas_cumprod.to(model.device)

    def make_sigmas(self, S: int) -> torch.Tensor:
        """diffusers' DPMSolverMultistepScheduler timesteps and a clean end, unless a spacing was chosen."""
        if not self.default_spacing:
            return super().make_sigmas(S)
        schedule = self.model.schedule
        return torch.cat([schedule.t_to_sigma(dpm_solver_timesteps(S, schedule.num_timesteps)),
                          torch.zeros(1, dtype=torch.float64)])

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: Any = None, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, None]:
        """Draw `batch_size` samples of `shape` with S solver steps; returns (samples, None) as the original.

        Takes the arguments of DDIMSampler.sample. The solver is deterministic: `eta`, `temperature` and
        `noise_dropout` have no effect. `seeds` (not in the original): one int per sample.
        """
        samples, _ = super().sample(S, batch_size, shape, conditioning, *args, **kwargs)
        return samples.to(self.model.device), None
