"""The Euler / Heun / DPM2 / LMS family against k-diffusion's sample_* functions and diffusers' schedulers.

k-diffusion runs its CompVis wrappers (CompVisDenoiser / CompVisVDenoiser, i.e. its own sigma_to_t and scalings)
around the same fake CompVis model our `model_denoiser` wraps, with classifier-free guidance, the same start latent
and the same noise; diffusers runs its scheduler loop on the same network function. Final latents must agree to a
relative 1e-5.
"""
from __future__ import annotations

import pytest
import torch

from ldm.sampling import SAMPLERS, Denoiser, NoiseSchedule
from ldm.sampling.denoiser import model_denoiser
from ldm.sampling.schedule import spacing

import diffusers  # the test-only reference (setup.py test extra): missing, the suite fails

T = 1000
TOL = 1e-5
SHAPE = (2, 4, 8, 8)
SD = dict(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
KDIFFUSION = {"euler": "sample_euler", "euler_ancestral": "sample_euler_ancestral", "heun": "sample_heun",
              "dpm2": "sample_dpm_2", "dpm2_ancestral": "sample_dpm_2_ancestral", "lms": "sample_lms"}
ANCESTRAL = {"euler_ancestral", "dpm2_ancestral"}
PARAM = {"epsilon": "eps", "v_prediction": "v"}


def network(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """A deterministic nonlinear stand-in for a UNet: depends on x, t, neighbouring pixels and the conditioning."""
    tt = t.float().reshape(-1, 1, 1, 1) / T
    out = torch.tanh(0.8 * x + torch.sin(6 * tt)) * (0.6 + tt) + 0.2 * x.roll(1, dims=-1) * torch.cos(3 * tt)
    return out if cond is None else out + 0.3 * cond.reshape(-1, 1, 1, 1)


class CompVisModel(torch.nn.Module):
    """What k-diffusion's CompVis wrappers and our model_denoiser read: apply_model, alphas_cumprod, schedule."""

    def __init__(self, parameterization: str):
        super().__init__()
        self.schedule = NoiseSchedule.from_config("linear", T, linear_start=0.00085, linear_end=0.012)
        self.register_buffer("alphas_cumprod", self.schedule.buffers()["alphas_cumprod"])
        self.parameterization = parameterization

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return network(x, t, cond)


class KGuided:
    """Classifier-free guidance around a k-diffusion denoiser (A1111's CFGDenoiser, without its extras)."""

    def __init__(self, inner, cond: torch.Tensor, uncond: torch.Tensor, scale: float):
        self.inner, self.cond, self.uncond, self.scale = inner, cond, uncond, scale

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        both = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([self.uncond, self.cond]))
        uncond, cond = both.chunk(2)
        return uncond + self.scale * (cond - uncond)


def draws(count: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=gen) for _ in range(count)]


class ListNoise:
    """Hands out pre-drawn tensors in order (the same list k-diffusion's noise_sampler gets)."""

    def __init__(self, noises: list[torch.Tensor]):
        self.noises = list(noises)

    def randn(self, shape, dtype=torch.float32):
        return self.noises.pop(0).to(dtype)


class GeneratorNoise:
    """Draws from one torch.Generator in call order, as diffusers' schedulers do with `generator=`."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, shape, dtype=torch.float32):
        return torch.randn(tuple(shape), generator=self.gen, dtype=dtype)


def rel_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


@pytest.mark.parametrize("name", sorted(KDIFFUSION))
@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("kind", ["karras", "linspace"])
def test_matches_k_diffusion_with_guidance(kd, name: str, parameterization: str, kind: str) -> None:
    model = CompVisModel(parameterization)
    wrapper = (kd.external.CompVisDenoiser if parameterization == "eps" else kd.external.CompVisVDenoiser)(model)
    cond, uncond = torch.tensor([0.5, -1.0]), torch.zeros(2)
    sigmas = spacing(kind, 10, model.schedule)
    x = draws(1, 0)[0] * sigmas[0].item()
    noises = draws(10, 1)
    extra = {}
    if name in ANCESTRAL:
        given = iter(noises)
        extra["noise_sampler"] = lambda sigma, sigma_next: next(given)
    theirs = getattr(kd.sampling, KDIFFUSION[name])(KGuided(wrapper, cond, uncond, 4.0), x.clone(), sigmas.float(),
                                                    disable=True, **extra)
    ours = SAMPLERS[name].fn(model_denoiser(model, cond, uncond, 4.0), sigmas, x.clone(), noise=ListNoise(noises))
    assert rel_diff(ours, theirs) <= TOL


@pytest.mark.parametrize("name", ["euler", "heun", "dpm2"])
def test_churn_matches_k_diffusion(kd, name: str) -> None:
    """s_churn adds noise from torch's global generator in k-diffusion (one draw per step); ours draws from the same
    generator where gamma > 0, which is every step inside the default [s_tmin, s_tmax]."""
    from ldm.sampling.noise import GlobalNoise

    model = CompVisModel("eps")
    sigmas = spacing("karras", 8, model.schedule)
    x = draws(1, 0)[0] * sigmas[0].item()
    torch.manual_seed(7)
    theirs = getattr(kd.sampling, KDIFFUSION[name])(kd.external.CompVisDenoiser(model), x.clone(), sigmas.float(),
                                                    disable=True, s_churn=2.0, s_noise=1.003)
    torch.manual_seed(7)
    ours = SAMPLERS[name].fn(model_denoiser(model), sigmas, x.clone(), noise=GlobalNoise(), s_churn=2.0, s_noise=1.003)
    assert rel_diff(ours, theirs) <= TOL


DIFFUSERS = {"euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
             "heun": "HeunDiscreteScheduler", "dpm2": "KDPM2DiscreteScheduler",
             "dpm2_ancestral": "KDPM2AncestralDiscreteScheduler", "lms": "LMSDiscreteScheduler"}


def run_diffusers(scheduler, x: torch.Tensor, seed: int) -> torch.Tensor:
    """The diffusers loop: scale_model_input, the network at each scheduler timestep, step (with a generator)."""
    import inspect

    gen = torch.Generator().manual_seed(seed)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    for t in scheduler.timesteps:
        out = network(scheduler.scale_model_input(x, t), t.expand(x.shape[0]))
        x = scheduler.step(out, t, x, **({"generator": gen} if takes_generator else {})).prev_sample
    return x


def base_ladder(spacing_options: dict, steps: int) -> torch.Tensor:
    """The noise levels every one of these schedulers steps through (EulerDiscrete's sigmas, float32 there)."""
    sched = diffusers.EulerDiscreteScheduler(**SD, **spacing_options)
    sched.set_timesteps(steps)
    return sched.sigmas.double()


SPACING_OPTIONS = {"default": {}, "karras": {"use_karras_sigmas": True}, "trailing": {"timestep_spacing": "trailing"}}
# diffusers' EulerAncestralDiscreteScheduler has no Karras option, and its KDPM2 schedulers round their Karras
# timesteps (k-diffusion's, and ours, evaluate the network at the levels' exact timesteps): those pairs are
# checked against k-diffusion above instead.
DIFFUSERS_CASES = [(name, kind) for name in sorted(DIFFUSERS) for kind in SPACING_OPTIONS
                   if not (kind == "karras" and name in ("euler_ancestral", "dpm2", "dpm2_ancestral"))]


@pytest.mark.parametrize("name,kind", DIFFUSERS_CASES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_matches_diffusers_schedulers(name: str, kind: str, prediction_type: str) -> None:
    """Default spacing (linspace timesteps, linearly interpolated levels), Karras and trailing."""
    options = SPACING_OPTIONS[kind]
    cls = getattr(diffusers, DIFFUSERS[name])
    sched = cls(**SD, prediction_type=prediction_type, **options)
    sched.set_timesteps(12)
    x = draws(1, 0)[0] * sched.init_noise_sigma
    theirs = run_diffusers(sched, x.clone(), seed=3)
    schedule = CompVisModel("eps").schedule
    sigmas = base_ladder(options, 12)
    ours = SAMPLERS[name].fn(Denoiser(network, schedule, PARAM[prediction_type]), sigmas, x.clone(),
                             noise=GeneratorNoise(3))
    assert rel_diff(ours, theirs) <= TOL


def test_our_spacings_are_the_ladders_diffusers_steps_through() -> None:
    schedule = CompVisModel("eps").schedule
    for options, kind in (({"use_karras_sigmas": True}, "karras"), ({"timestep_spacing": "trailing"}, "trailing")):
        torch.testing.assert_close(spacing(kind, 12, schedule), base_ladder(options, 12), rtol=1e-4, atol=0)
