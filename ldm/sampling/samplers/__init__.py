"""Every sampler, registered by name in one table (`SAMPLERS`); the contract they share is in `base`.

Adding a sampler is one function (a module of this package, with the signature of `base`) and one line in the
table below: scripts (`--sampler NAME`), `ldm.inference`, `log_images(sampler=NAME)` and the web UI list
samplers from it. Names are k-diffusion's without the `sample_` prefix, plus ddim, plms, ddpm and unipc.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from ldm.sampling.samplers.base import Denoise, NoiseSource, StepCallback


@dataclass(frozen=True)
class SamplerSpec:
    """One registry entry: the function ("module.function" of this package, a full dotted path, or the function
    itself), whether it draws noise, its default spacing and final level, and its names in k-diffusion, diffusers
    and AUTOMATIC1111's web UI."""

    target: str | Callable
    stochastic: bool = False
    spacing: str = "karras"
    final: str = "zero"
    k_diffusion: str | None = None
    diffusers: str | None = None
    a1111: str | None = None

    @property
    def fn(self) -> Callable:
        """The sampler function (imported on first use)."""
        if callable(self.target):
            return self.target
        path = self.target if self.target.count(".") > 1 else f"{__name__}.{self.target}"
        module, name = path.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)


# name: SamplerSpec(target, stochastic, default spacing, final level, k-diffusion, diffusers, AUTOMATIC1111)
SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec("ddim.ddim", False, "uniform", "min", None, "DDIMScheduler", "DDIM"),
    "plms": SamplerSpec("plms.plms", False, "uniform", "min", None, "PNDMScheduler(skip_prk_steps=True)", "PLMS"),
    "ddpm": SamplerSpec("ddpm.ddpm", True, "leading", "zero", None, "DDPMScheduler", None),
    "dpmpp_2m": SamplerSpec("dpm_solver.dpmpp_2m", False, "karras", "zero", "sample_dpmpp_2m",
                            "DPMSolverMultistepScheduler", "DPM++ 2M"),
    "euler": SamplerSpec("euler.euler", False, "karras", "zero", "sample_euler", "EulerDiscreteScheduler", "Euler"),
    "euler_ancestral": SamplerSpec("euler.euler_ancestral", True, "karras", "zero", "sample_euler_ancestral",
                                   "EulerAncestralDiscreteScheduler", "Euler a"),
    "heun": SamplerSpec("euler.heun", False, "karras", "zero", "sample_heun", "HeunDiscreteScheduler", "Heun"),
    "dpm2": SamplerSpec("euler.dpm2", False, "karras", "zero", "sample_dpm_2", "KDPM2DiscreteScheduler", "DPM2"),
    "dpm2_ancestral": SamplerSpec("euler.dpm2_ancestral", True, "karras", "zero", "sample_dpm_2_ancestral",
                                  "KDPM2AncestralDiscreteScheduler", "DPM2 a"),
    "lms": SamplerSpec("lms.lms", False, "karras", "zero", "sample_lms", "LMSDiscreteScheduler", "LMS"),
    "dpmpp_2s_ancestral": SamplerSpec("dpmpp_sde.dpmpp_2s_ancestral", True, "karras", "zero",
                                      "sample_dpmpp_2s_ancestral", None, "DPM++ 2S a Karras"),
    "dpmpp_sde": SamplerSpec("dpmpp_sde.dpmpp_sde", True, "karras", "zero", "sample_dpmpp_sde",
                             "DPMSolverSDEScheduler(use_karras_sigmas=True)", "DPM++ SDE Karras"),
    "dpmpp_2m_sde": SamplerSpec("dpmpp_sde.dpmpp_2m_sde", True, "karras", "zero", "sample_dpmpp_2m_sde",
                                "DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++', use_karras_sigmas=True)",
                                "DPM++ 2M SDE Karras"),
    "dpmpp_3m_sde": SamplerSpec("dpmpp_sde.dpmpp_3m_sde", True, "karras", "zero", "sample_dpmpp_3m_sde",
                                "DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++', solver_order=3, "
                                "solver_type='heun', use_karras_sigmas=True)", "DPM++ 3M SDE Karras"),
    "unipc": SamplerSpec("unipc.unipc", False, "karras", "zero", None,
                         "UniPCMultistepScheduler(use_karras_sigmas=True)", "UniPC"),
}

ALIASES = {"dpm": "dpmpp_2m", "dpm_solver": "dpmpp_2m"}


def sampler_spec(name: str) -> SamplerSpec:
    """The registry entry of a sampler name (or alias); an unknown name raises, listing the known ones."""
    key = ALIASES.get(name, name)
    if key not in SAMPLERS:
        raise ValueError(f"sampler '{name}' unknown; expected one of {', '.join(SAMPLERS)}")
    return SAMPLERS[key]


__all__ = ["ALIASES", "Denoise", "NoiseSource", "SAMPLERS", "SamplerSpec", "StepCallback", "sampler_spec"]
