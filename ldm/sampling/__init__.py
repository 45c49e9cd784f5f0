"""The diffusion process as small pure parts shared by training and sampling (see DESIGN.md)."""
from ldm.sampling.denoiser import Denoiser
from ldm.sampling.guidance import combine, concat_conditioning, guided_model_fn
from ldm.sampling.noise import GlobalNoise, SeededNoise, make_noise
from ldm.sampling.parameterization import Prediction, check_parameterization, to_prediction, training_target
from ldm.sampling.schedule import NoiseSchedule

__all__ = [
    "Denoiser", "GlobalNoise", "NoiseSchedule", "Prediction", "SeededNoise", "check_parameterization",
    "combine", "concat_conditioning", "guided_model_fn", "make_noise", "to_prediction", "training_target",
]
