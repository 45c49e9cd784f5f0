"""The diffusion process as small pure parts shared by training and sampling (see DESIGN.md)."""
from ldm.sampling.denoiser import Denoiser
from ldm.sampling.guidance import combine, concat_conditioning, guided_model_fn
from ldm.sampling.noise import GlobalNoise, SeededNoise, make_noise
from ldm.sampling.parameterization import (
    PARAMETERIZATIONS,
    Prediction,
    check_parameterization,
    edm_scalings,
    to_prediction,
    training_target,
)
from ldm.sampling.samplers import ALIASES, SAMPLERS, SamplerSpec, sampler_spec
from ldm.sampling.schedule import (
    EDMSchedule,
    FlowSchedule,
    NoiseSchedule,
    Schedule,
    build_schedule,
    rescale_zero_terminal_snr,
    spacing,
)

__all__ = [
    "ALIASES", "SAMPLERS", "SamplerSpec", "sampler_spec", "Denoiser", "EDMSchedule", "FlowSchedule", "GlobalNoise",
    "NoiseSchedule", "PARAMETERIZATIONS", "Prediction",
    "Schedule", "SeededNoise", "build_schedule", "check_parameterization", "combine", "concat_conditioning",
    "edm_scalings", "guided_model_fn", "make_noise", "rescale_zero_terminal_snr", "spacing", "to_prediction",
    "training_target",
]
