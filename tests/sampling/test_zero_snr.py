"""Zero terminal SNR end to end (Lin et al. 2023): v-prediction with trailing spacing samples from alpha_bar_T = 0
with DDIM and Euler; guidance rescale equals diffusers' rescale_noise_cfg and reaches every sampler."""
from __future__ import annotations

import math

import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.sampler import Sampler
from ldm.sampling import SAMPLERS, Denoiser, NoiseSchedule, combine
from ldm.sampling.schedule import spacing

import diffusers  # the test-only reference (setup.py test extra): missing, the suite fails
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg  # noqa: E402

T = 1000
SD = dict(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
ZSNR = NoiseSchedule.from_config("linear", T, linear_start=0.00085, linear_end=0.012, zero_terminal_snr=True)
SHAPE = (2, 4, 8, 8)
TOL = 1e-5


def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tt = t.float().reshape(-1, 1, 1, 1) / T
    return torch.tanh(0.8 * x + torch.sin(6 * tt)) * (0.6 + tt) + 0.2 * x.roll(1, dims=-1) * torch.cos(3 * tt)


def noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def rel_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


class ListNoise:
    def __init__(self, draws):
        self.draws = list(draws)

    def randn(self, shape, dtype=torch.float32):
        return self.draws.pop(0).to(dtype)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_from_pure_noise_equals_diffusers(set_alpha_to_one: bool) -> None:
    """eta = 0 (diffusers' DDIMScheduler gives NaN for eta > 0 at alpha_bar_T = 0; see the next test for eta = 1)."""
    eta = 0.0
    sched = diffusers.DDIMScheduler(**SD, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                    prediction_type="v_prediction", clip_sample=False,
                                    set_alpha_to_one=set_alpha_to_one)
    sched.set_timesteps(10)
    assert sched.timesteps[0] == T - 1 and sched.alphas_cumprod[-1] == 0
    draws = [noise(10 + i) for i in range(10)]
    x = noise()
    for i, t in enumerate(sched.timesteps):
        x = sched.step(network(x, t.expand(2)), t, x, eta=eta, variance_noise=draws[i]).prev_sample
    sigmas = spacing("trailing", 10, ZSNR, final="zero" if set_alpha_to_one else "min")
    assert math.isinf(float(sigmas[0]))
    ours = SAMPLERS["ddim"].fn(Denoiser(network, ZSNR, "v"), sigmas, noise(), eta=eta, noise=ListNoise(draws))
    assert rel_diff(ZSNR.from_ve(ours, sigmas[-1]), x) <= TOL


def test_ddim_with_eta_one_from_pure_noise_is_euler_ancestral() -> None:
    """DDIM's sigma_t(eta) of Song et al. eq. 16 is the ancestral step of k-diffusion in VE form: same result."""
    sigmas = spacing("trailing", 10, ZSNR)
    draws = [noise(20 + i) for i in range(10)]
    denoise = Denoiser(network, ZSNR, "v")
    ddim = SAMPLERS["ddim"].fn(denoise, sigmas, noise(), eta=1.0, noise=ListNoise(draws))
    ancestral = SAMPLERS["euler_ancestral"].fn(denoise, sigmas, noise(), eta=1.0, noise=ListNoise(draws))
    assert bool(torch.isfinite(ddim).all()) and rel_diff(ddim, ancestral) <= TOL


def clamped(alpha_bar_T: float) -> NoiseSchedule:
    """The zero-SNR schedule with alpha_bar_T raised to a tiny positive value (diffusers' Euler schedulers)."""
    a = ZSNR.alphas_cumprod.clone()
    a[-1] = alpha_bar_T
    return NoiseSchedule(1 - a / torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]]))


def test_euler_equals_diffusers_which_clamps_alpha_bar_T_and_tends_to_our_exact_start() -> None:
    """diffusers' EulerDiscreteScheduler sets alpha_bar_T = 2**-24 (sigma_max = 4096) so its first level is finite;
    with the same clamp ours agrees to 5e-5 (both lose ~4096 * 6e-8 absolute in float32 cancelling x ~ 4096 in the
    first step). Without the clamp ours starts from the exact pure-noise level (no cancellation), which the clamped
    runs approach as the clamp shrinks."""
    sched = diffusers.EulerDiscreteScheduler(**SD, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                             prediction_type="v_prediction")
    sched.set_timesteps(10)
    x = noise() * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(network(sched.scale_model_input(x, t), t.expand(2)), t, x).prev_sample
    diffusers_clamp = clamped(2.0**-24)
    sigmas = spacing("trailing", 10, diffusers_clamp)
    assert float(sigmas[0]) == pytest.approx(4096, rel=1e-6)
    ours = SAMPLERS["euler"].fn(Denoiser(network, diffusers_clamp, "v"), sigmas, noise() * float(sigmas[0]))
    assert rel_diff(ours, x) <= 5e-5
    # in float64, where the first step's cancellation at a huge finite level costs nothing
    exact = SAMPLERS["euler"].fn(Denoiser(network, ZSNR, "v"), spacing("trailing", 10, ZSNR), noise().double())
    gaps = []
    for clamp in (2.0**-24, 2.0**-40):
        schedule = clamped(clamp)
        levels = spacing("trailing", 10, schedule)
        run = SAMPLERS["euler"].fn(Denoiser(network, schedule, "v"), levels,
                                   schedule.to_ve(noise().double(), levels[0]))
        gaps.append(rel_diff(run, exact))
    assert gaps[1] < 1e-6 and gaps[1] < gaps[0] / 100


def test_every_sampler_runs_a_zero_snr_v_model_from_pure_noise() -> None:
    model = RescaleModel("v", ZSNR)
    for name in SAMPLERS:
        sampler = Sampler(model, name)
        assert sampler.spacing in ("trailing", SAMPLERS[name].spacing)  # karras / exponential need a finite top
        out, _ = sampler.sample(8, 2, SHAPE[1:], x_T=noise(), verbose=False, seeds=[1, 2])
        assert bool(torch.isfinite(out).all()), name
    ddim = DDIMSampler(model, spacing="trailing")
    ddim.make_schedule(10, verbose=False)
    assert ddim.ddim_timesteps[-1] == T - 1 and ddim.ddim_alphas[-1] == 0


@pytest.mark.parametrize("rescale", [0.0, 0.5, 0.7, 1.0])
def test_guidance_rescale_equals_diffusers(rescale: float) -> None:
    gen = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen) * 1.5 + 0.2
    guided = uncond + 7.5 * (cond - uncond)
    torch.testing.assert_close(combine(uncond, cond, 7.5, rescale), rescale_noise_cfg(guided, cond, rescale))


class RescaleModel:
    """A conditional toy model; `manual` makes apply_model return the rescaled guided output itself."""

    def __init__(self, parameterization: str = "eps", schedule: NoiseSchedule | None = None, manual=None):
        self.schedule = schedule or NoiseSchedule.from_config("linear", T, linear_start=0.00085, linear_end=0.012)
        self.parameterization, self.num_timesteps, self.device = parameterization, T, torch.device("cpu")
        self.manual = manual

    def raw(self, x, t, cond):
        return network(x, t) * (1.0 if cond is None else 1 + 0.4 * cond.reshape(-1, 1, 1, 1))

    def apply_model(self, x, t, cond):
        if self.manual is None:
            return self.raw(x, t, cond)
        uncond_c, scale, rescale = self.manual
        return combine(self.raw(x, t, uncond_c), self.raw(x, t, cond), scale, rescale)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_guidance_rescale_reaches_every_sampler(name: str) -> None:
    cond, uncond = torch.tensor([1.0, -0.5]), torch.zeros(2)
    kw = dict(conditioning=cond, unconditional_conditioning=uncond, unconditional_guidance_scale=5.0, verbose=False,
              seeds=[1, 2])
    plain, _ = Sampler(RescaleModel(), name).sample(6, 2, SHAPE[1:], **kw)
    rescaled, _ = Sampler(RescaleModel(), name).sample(6, 2, SHAPE[1:], guidance_rescale=0.7, **kw)
    manual, _ = Sampler(RescaleModel(manual=(uncond, 5.0, 0.7)), name).sample(6, 2, SHAPE[1:], conditioning=cond,
                                                                               verbose=False, seeds=[1, 2])
    assert not torch.allclose(plain, rescaled)
    torch.testing.assert_close(rescaled, manual, rtol=1e-5, atol=1e-5)
