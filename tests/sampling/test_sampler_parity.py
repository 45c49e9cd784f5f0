"""DDIM, PLMS, DPM++(2M) and DDPM on the sampler contract against diffusers' schedulers, same network and noise."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.sampling import Denoiser, NoiseSchedule
from ldm.sampling.samplers.ddim import ddim
from ldm.sampling.samplers.ddpm import ddpm
from ldm.sampling.samplers.dpm_solver import dpmpp_2m
from ldm.sampling.samplers.plms import plms
from ldm.sampling.schedule import dpm_solver_timesteps, spaced_timesteps, spacing

import diffusers  # the test-only reference (setup.py test extra): missing, the suite fails

T = 1000
SD_BETAS = dict(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
PARAM = {"epsilon": "eps", "v_prediction": "v"}
TOL = 1e-5


def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic nonlinear stand-in for a network, depending on x, t and neighbouring pixels."""
    tt = t.float().reshape(-1, 1, 1, 1) / T
    return torch.tanh(0.8 * x + torch.sin(6 * tt)) * (0.6 + tt) + 0.2 * x.roll(1, dims=-1) * torch.cos(3 * tt)


def schedule() -> NoiseSchedule:
    """Our SD schedule ("linear" in sqrt(beta), the same as diffusers' "scaled_linear")."""
    return NoiseSchedule.from_config("linear", T, linear_start=0.00085, linear_end=0.012)


def x_T() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def run_diffusers(scheduler, x: torch.Tensor, noises: list[torch.Tensor] | None = None, fn=model_fn) -> torch.Tensor:
    """The usual diffusers loop: model output at each scheduler timestep, then scheduler.step."""
    x = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        out = fn(x, t.expand(x.shape[0]))
        kwargs = {} if noises is None else {"eta": 1.0, "variance_noise": noises[i]}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


def run_ours(sampler, sigmas: torch.Tensor, parameterization: str, x: torch.Tensor, fn=model_fn, **kwargs):
    """Our sampler from the process-scale x (converted to and from the VE-normalised latent)."""
    s = schedule()
    out = sampler(Denoiser(fn, s, parameterization), sigmas, s.to_ve(x, sigmas[0]), **kwargs)
    return s.from_ve(out, sigmas[-1])


def rel_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


class ListNoise:
    """A noise source that hands out pre-drawn tensors in order (to inject diffusers' noise)."""

    def __init__(self, draws: list[torch.Tensor]):
        self.draws = list(draws)

    def randn(self, shape, dtype=torch.float32):
        z = self.draws.pop(0)
        assert tuple(z.shape) == tuple(shape)
        return z.to(dtype)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers_ddim_scheduler(prediction_type: str, steps: int, eta: float) -> None:
    sched = diffusers.DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                    timestep_spacing="leading", prediction_type=prediction_type)
    sched.set_timesteps(steps)
    np.testing.assert_array_equal(sched.timesteps.numpy(), spaced_timesteps("uniform", steps, T))
    gen = torch.Generator().manual_seed(1)
    noises = [torch.randn(2, 4, 8, 8, generator=gen) for _ in range(steps)] if eta > 0 else None
    theirs = run_diffusers(sched, x_T(), noises)
    ours = run_ours(ddim, spacing("uniform", steps, schedule(), final="min"), PARAM[prediction_type], x_T(),
                    eta=eta, noise=ListNoise(noises or []))
    assert rel_diff(ours, theirs) <= TOL


def eps_of_v_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """model_fn read as a v prediction, converted to eps = sqrt(a) v + sqrt(1 - a) x_t."""
    alpha, sigma = schedule().coefficients(t, x)
    return alpha * model_fn(x, t) + sigma * x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 25])
def test_plms_matches_diffusers_pndm_without_prk(prediction_type: str, steps: int) -> None:
    """PLMS keeps eps in its multistep history (as the original); diffusers' PNDM keeps the raw model
    output, so for a v model it combines v's. We therefore drive diffusers with the eps of the v model."""
    sched = diffusers.PNDMScheduler(**SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                                    timestep_spacing="leading", prediction_type="epsilon")
    sched.set_timesteps(steps)
    theirs = run_diffusers(sched, x_T(), fn=model_fn if prediction_type == "epsilon" else eps_of_v_fn)
    evaluated: list[int] = []

    def counting_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        evaluated.append(int(t[0]))
        return model_fn(x, t)

    ours = run_ours(plms, spacing("uniform", steps, schedule(), final="min"), PARAM[prediction_type], x_T(),
                    fn=counting_fn)
    # same evaluations: the pseudo improved Euler step evaluates twice at the second timestep
    assert evaluated == sched.timesteps.tolist()
    assert rel_diff(ours, theirs) <= TOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_dpmpp_2m_matches_diffusers_multistep(prediction_type: str, steps: int, final: str) -> None:
    sched = diffusers.DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++", solver_order=2,
                                                  lower_order_final=True, final_sigmas_type=final,
                                                  prediction_type=prediction_type)
    sched.set_timesteps(steps)
    timesteps = dpm_solver_timesteps(steps, T)
    np.testing.assert_array_equal(sched.timesteps.numpy(), timesteps)
    theirs = run_diffusers(sched, x_T())
    s = schedule()
    sigmas = torch.cat([s.t_to_sigma(timesteps), torch.tensor([0.0 if final == "zero" else s.sigma_min]).double()])
    ours = run_ours(dpmpp_2m, sigmas, PARAM[prediction_type], x_T())
    assert rel_diff(ours, theirs) <= TOL


class GeneratorNoise:
    """Draws from one torch.Generator in call order, as diffusers' schedulers do with `generator=`."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, shape, dtype=torch.float32):
        return torch.randn(tuple(shape), generator=self.gen, dtype=dtype)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [50, 10])
def test_ddpm_matches_diffusers_ddpm(prediction_type: str, steps: int) -> None:
    """Every timestep of a 50-step schedule (the original sampler), and 10 of them (the strided posterior)."""
    s = NoiseSchedule.from_config("linear", 50, linear_start=1e-3, linear_end=0.2)
    sched = diffusers.DDPMScheduler(num_train_timesteps=50, trained_betas=s.betas.numpy(), variance_type="fixed_small",
                                    clip_sample=False, prediction_type=prediction_type)
    sched.set_timesteps(steps)
    x, gen = x_T(), torch.Generator().manual_seed(2)
    theirs = x.clone()
    for t in sched.timesteps:
        theirs = sched.step(model_fn(theirs, t.expand(2) * 20), t, theirs, generator=gen).prev_sample
    sigmas = torch.cat([s.t_to_sigma(sched.timesteps), torch.zeros(1).double()])
    ours = ddpm(Denoiser(lambda x, t: model_fn(x, t * 20), s, PARAM[prediction_type]), sigmas, s.to_ve(x, sigmas[0]),
                noise=GeneratorNoise(2))
    assert rel_diff(ours, theirs) <= TOL
