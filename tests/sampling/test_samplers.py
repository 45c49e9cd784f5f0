"""Properties of the sampler functions in ldm.sampling.samplers, on small closed-form models."""
from __future__ import annotations

import math

import pytest
import torch

from ldm.modules.diffusionmodules.util import make_ddim_timesteps
from ldm.sampling import Denoiser, NoiseSchedule, SeededNoise
from ldm.sampling.parameterization import training_target
from ldm.sampling.samplers import (
    adams_bashforth,
    ddim,
    ddim_inversion,
    ddpm_ancestral,
    dpmpp_2m,
    linspace_timesteps,
    plms,
)

T = 1000
SHAPE = (2, 4, 8, 8)
SCHEDULE = NoiseSchedule.from_config("linear", T, linear_start=0.00085, linear_end=0.012)
SHORT = NoiseSchedule.from_config("linear", 50, linear_start=1e-3, linear_end=0.2)  # for all-step ancestral runs
MU = torch.linspace(-0.9, 0.9, math.prod(SHAPE[1:])).reshape(SHAPE[1:])


def gaussian_model(schedule: NoiseSchedule, parameterization: str, std: float = 0.0):
    """The exact model for data x0 ~ N(MU, std^2 I), answering in the given parameterization.

    E[x0 | x_t] = MU + sqrt(a) std^2 / (a std^2 + 1 - a) (x_t - sqrt(a) MU); std=0 is a point mass at MU.
    """
    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = schedule.alpha_bar(t, x.ndim)
        x0 = MU + a.sqrt() * std**2 / (a * std**2 + 1 - a) * (x - a.sqrt() * MU)
        return training_target(parameterization, x0, (x - a.sqrt() * x0) / (1 - a).sqrt(), a.sqrt(), (1 - a).sqrt())

    return Denoiser(fn, schedule, parameterization)


def nonlinear(schedule: NoiseSchedule = SCHEDULE, parameterization: str = "eps") -> Denoiser:
    """A deterministic nonlinear per-pixel model."""
    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.float().reshape(-1, 1, 1, 1) / schedule.num_timesteps
        return torch.tanh(0.8 * x + torch.sin(6 * tt)) * (0.6 + tt)

    return Denoiser(fn, schedule, parameterization)


def x_T(batch: int = SHAPE[0], seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *SHAPE[1:], generator=torch.Generator().manual_seed(seed))


DDIM_T = make_ddim_timesteps("uniform", 20, T)[::-1]


def run(name: str, denoise, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """Run one of the samplers on its usual timesteps, ending on a clean sample."""
    if name == "ancestral":
        return ddpm_ancestral(denoise, SHORT, x, **kwargs)
    if name == "dpmpp_2m":
        return dpmpp_2m(denoise, SCHEDULE, linspace_timesteps(20, T), x, **kwargs)
    if name == "plms":
        return plms(denoise, SCHEDULE, DDIM_T, x, final_alpha_bar=1.0, **kwargs)
    eta = 1.0 if name == "ddim_eta1" else 0.0
    return ddim(denoise, SCHEDULE, DDIM_T, x, eta=eta, final_alpha_bar=1.0, **kwargs)


def schedule_of(name: str) -> NoiseSchedule:
    return SHORT if name == "ancestral" else SCHEDULE


SAMPLERS = ["ddim", "ddim_eta1", "plms", "dpmpp_2m", "ancestral"]
DETERMINISTIC = ["ddim", "plms", "dpmpp_2m"]


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_exact_model_of_a_point_mass_lands_on_it(name: str, parameterization: str) -> None:
    out = run(name, gaussian_model(schedule_of(name), parameterization), x_T())
    torch.testing.assert_close(out, MU.expand(SHAPE), atol=2e-4, rtol=0)


@pytest.mark.parametrize("name", SAMPLERS)
def test_callback_sees_every_step_and_the_result(name: str) -> None:
    seen: list[dict] = []
    out = run(name, nonlinear(schedule_of(name)), x_T(), callback=seen.append)
    assert [s["i"] for s in seen] == list(range(len(seen))) and len(seen) > 1
    assert all(s["t"] > n["t"] for s, n in zip(seen, seen[1:]))
    assert torch.equal(seen[-1]["x"], out) and seen[-1]["x0"].shape == out.shape


@pytest.mark.parametrize("name", SAMPLERS)
def test_inpainting_with_full_mask_returns_x0(name: str) -> None:
    known = x_T(seed=5).clamp(-1, 1)
    seen: list[dict] = []
    out = run(name, nonlinear(schedule_of(name)), x_T(), mask=torch.ones(SHAPE), x0=known, callback=seen.append)
    # the known region is pasted in at the last evaluated timestep: the rest is that step's noise level
    a_last = float(schedule_of(name).alphas_cumprod[seen[-1]["t"]])
    assert (out - known).abs().max() <= 6 * math.sqrt(1 - a_last)
    free = run(name, nonlinear(schedule_of(name)), x_T())
    assert (free - known).abs().max() > 10 * math.sqrt(1 - a_last)


class ZeroNoise:
    def randn(self, shape, dtype=torch.float32):
        return torch.zeros(tuple(shape), dtype=dtype)


@pytest.mark.parametrize("name", SAMPLERS)
def test_inpainting_with_empty_mask_is_the_unmasked_run(name: str) -> None:
    # the inpainting noise is drawn from the same source, so stochastic samplers get a silent one here
    noise = None if name in DETERMINISTIC else ZeroNoise()
    plain = run(name, nonlinear(schedule_of(name)), x_T(), noise=noise)
    masked = run(name, nonlinear(schedule_of(name)), x_T(), noise=noise, mask=torch.zeros(SHAPE), x0=x_T(seed=9))
    torch.testing.assert_close(masked, plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["ddim_eta1", "ancestral"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_seeded_samples_do_not_depend_on_the_batch(name: str, dropout: float) -> None:
    seeds = [11, 12, 13, 14, 15, 16, 17, 18]
    batch = run(name, nonlinear(schedule_of(name)), SeededNoise(seeds).randn((8, *SHAPE[1:])),
                noise=SeededNoise(seeds), noise_dropout=dropout)
    for i in (0, 5):
        alone = run(name, nonlinear(schedule_of(name)), SeededNoise([seeds[i]]).randn((1, *SHAPE[1:])),
                    noise=SeededNoise([seeds[i]]), noise_dropout=dropout)
        torch.testing.assert_close(alone[0], batch[i], atol=1e-6, rtol=0)
    assert not torch.allclose(batch[0], batch[1])


@pytest.mark.parametrize("name", ["ddim_eta1", "ancestral"])
def test_zero_temperature_removes_the_randomness(name: str) -> None:
    a = run(name, nonlinear(schedule_of(name)), x_T(), noise=SeededNoise([1, 2]), temperature=0.0)
    b = run(name, nonlinear(schedule_of(name)), x_T(), noise=SeededNoise([3, 4]), temperature=0.0)
    c = run(name, nonlinear(schedule_of(name)), x_T(), noise=SeededNoise([3, 4]))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_ddim_inversion_then_ddim_returns_the_input(parameterization: str) -> None:
    denoise = gaussian_model(SCHEDULE, parameterization, std=0.5)
    x0 = MU + 0.5 * x_T(seed=3)
    errors = []
    for n in (50, 100):
        steps = make_ddim_timesteps("uniform", n, T)
        latent = ddim_inversion(denoise, SCHEDULE, steps, x0)
        assert latent.std() > 0.9  # it did reach (nearly) pure noise
        back = ddim(denoise, SCHEDULE, steps[::-1], latent)
        errors.append(float((back - x0).abs().max() / x0.abs().max()))
    # a first-order method: small, and halving with twice the steps
    assert errors[0] < 0.05 and errors[1] < 0.6 * errors[0]


def test_adams_bashforth_is_exact_on_polynomials_of_its_order() -> None:
    # eps(k) = k^3 sampled at steps k = 0..-3: AB4 extrapolates a cubic's integral over [0, 1] exactly
    f = [torch.tensor(float(k) ** 3) for k in (-3, -2, -1, 0)]
    assert torch.isclose(adams_bashforth(f[3], f[:3]), torch.tensor(0.25))
    assert torch.isclose(adams_bashforth(f[3], []), f[3])


def test_linspace_timesteps_are_diffusers_linspace() -> None:
    assert linspace_timesteps(10, 1000).tolist() == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    with pytest.raises(ValueError, match="sampling steps"):
        linspace_timesteps(0, 1000)


def test_clear_errors() -> None:
    den, x = nonlinear(), x_T()
    with pytest.raises(ValueError, match="consecutive"):
        ddpm_ancestral(den, SCHEDULE, x, timesteps=[10, 8])
    with pytest.raises(ValueError, match="strictly decreasing"):
        ddim(den, SCHEDULE, [1, 21], x)
    with pytest.raises(ValueError, match=r"lie in \[0, 999\]"):
        dpmpp_2m(den, SCHEDULE, [1000, 500], x)
    with pytest.raises(ValueError, match="needs `x0`"):
        plms(den, SCHEDULE, [500, 1], x, mask=torch.ones(SHAPE))
    with pytest.raises(ValueError, match="too large"):
        ddim(den, SCHEDULE, [999, 1], x, eta=5.0)
    with pytest.raises(ValueError, match="increasing"):
        ddim_inversion(den, SCHEDULE, [21, 1], x)
