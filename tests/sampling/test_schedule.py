"""The process model (ldm.sampling.schedule) against diffusers' schedulers and k-diffusion's schedules."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import ldm.modules.diffusionmodules.util as module_util
from ldm.sampling import schedule as sch
from ldm.sampling.schedule import (
    EDMSchedule,
    FlowSchedule,
    NoiseSchedule,
    build_schedule,
    rescale_zero_terminal_snr,
    spaced_timesteps,
    spacing,
)

import diffusers  # the test-only reference (setup.py test extra): missing, the suite fails
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale  # noqa: E402

T = 1000
SD = dict(beta_schedule="linear", timesteps=T, linear_start=0.00085, linear_end=0.012)
F32_RTOL = 1e-4  # diffusers computes sigma = sqrt((1 - a) / a) from float32 alpha_bar: ~5e-5 relative near t = 0
KD_RTOL = 1e-5  # k-diffusion builds its ladders in float32
DIFFUSERS_SD = dict(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def sd_schedule(**kw) -> NoiseSchedule:
    return NoiseSchedule.from_config(**SD, **kw)


def test_sampling_imports_nothing_from_modules_and_the_old_path_reexports() -> None:
    root = Path(sch.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith(("ldm.modules", "ldm.models")) for n in names), (path, names)
    assert module_util.make_beta_schedule is sch.make_beta_schedule
    assert module_util.betas_for_alpha_bar is sch.betas_for_alpha_bar


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["linear", "sqrt_linear", "cosine"])
def test_zero_terminal_snr_equals_diffusers(kind: str, dtype: torch.dtype) -> None:
    betas = torch.from_numpy(sch.make_beta_schedule(kind, T, 0.00085, 0.012)).to(dtype)
    ours = rescale_zero_terminal_snr(betas)  # always in float64; diffusers keeps the input's precision
    theirs = diffusers_rescale(betas.clone().double())
    assert float((ours - theirs.double()).abs().max()) <= 1e-7
    schedule = NoiseSchedule(ours)
    assert schedule.alphas_cumprod[-1] == 0 and schedule.zero_terminal_snr
    assert math.isclose(float(schedule.alphas_cumprod[0]), 1 - float(betas[0]), rel_tol=1e-12)
    assert math.isinf(float(schedule.sigmas[-1])) and math.isinf(schedule.sigma_max)
    assert not sd_schedule().zero_terminal_snr


def test_sigmas_and_their_inverse_follow_k_diffusion(kd) -> None:
    s = sd_schedule()
    ref = kd.external.DiscreteSchedule(((1 - s.alphas_cumprod) / s.alphas_cumprod) ** 0.5, quantize=False)
    torch.testing.assert_close(s.sigmas, ref.sigmas, rtol=0, atol=0)
    assert s.sigma_min == float(ref.sigma_min) and s.sigma_max == float(ref.sigma_max)
    levels = torch.cat([torch.tensor([s.sigma_min, s.sigma_max], dtype=torch.float64),
                        torch.rand(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 14 + 0.03])
    torch.testing.assert_close(s.sigma_to_t(levels), ref.sigma_to_t(levels), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(s.sigma_to_t(levels, quantize=True), ref.sigma_to_t(levels, quantize=True).double())
    t = torch.rand(50, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * (T - 1)
    torch.testing.assert_close(s.t_to_sigma(t), ref.t_to_sigma(t).double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(t)), t, rtol=0, atol=1e-9)
    # table levels map to their integer timestep exactly (the model sees integer timesteps as the original did)
    ints = torch.arange(T, dtype=torch.float64)
    assert torch.equal(s.sigma_to_t(s.t_to_sigma(ints)), ints) and torch.equal(s.t_to_sigma(ints), s.sigmas)


def test_sigma_to_t_equals_diffusers_euler_sigma_to_t() -> None:
    s = sd_schedule()
    sched = diffusers.EulerDiscreteScheduler(**DIFFUSERS_SD)
    levels = np.geomspace(0.02, 20, 40)
    theirs = sched._sigma_to_t(levels, np.log(s.sigmas.numpy()))
    np.testing.assert_allclose(s.sigma_to_t(levels).numpy(), theirs, rtol=0, atol=1e-9)


def test_zero_terminal_snr_levels() -> None:
    s = sd_schedule(zero_terminal_snr=True)
    assert float(s.sigma_to_t(math.inf)) == T - 1 and float(s.model_time(math.inf)) == T - 1
    alpha, sigma = s.alpha_sigma(torch.tensor([math.inf, 0.0]))
    assert alpha.tolist() == [0.0, 1.0] and sigma.tolist() == [1.0, 0.0]
    torch.testing.assert_close(s.sigma_to_t(s.sigmas[:-1]), torch.arange(T - 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="between the last finite level"):
        s.sigma_to_t(float(s.sigmas[-2]) * 2)


@pytest.mark.parametrize("n", [10, 25, 50])
@pytest.mark.parametrize("kind,scheduler,options", [
    ("leading", "DDIMScheduler", dict(steps_offset=1)),
    ("leading", "EulerDiscreteScheduler", dict(steps_offset=1)),
    ("trailing", "DDIMScheduler", {}),
    ("trailing", "EulerDiscreteScheduler", {}),
    ("linspace", "EulerDiscreteScheduler", {}),
])
def test_grid_spacings_equal_diffusers_timesteps(kind: str, scheduler: str, options: dict, n: int) -> None:
    sched = getattr(diffusers, scheduler)(**DIFFUSERS_SD, timestep_spacing=kind, **options)
    sched.set_timesteps(n)
    ours = spaced_timesteps(kind, n, T, steps_offset=options.get("steps_offset", 0))
    np.testing.assert_allclose(ours, sched.timesteps.numpy(), rtol=0, atol=1e-4)
    if kind != "linspace":  # integer timesteps: the levels are the table's (diffusers interpolates linearly between)
        sigmas = spacing(kind, n, sd_schedule(), steps_offset=options.get("steps_offset", 0))
        if scheduler == "EulerDiscreteScheduler":  # diffusers derives its sigmas from float32 alphas_cumprod
            torch.testing.assert_close(sigmas.float(), sched.sigmas, rtol=F32_RTOL, atol=0)
        assert sigmas[-1] == 0 and len(sigmas) == n + 1


def test_uniform_and_quad_are_the_original_ddim_discretisations() -> None:
    assert spaced_timesteps("uniform", 4, T).tolist() == [751, 501, 251, 1]
    assert spaced_timesteps("uniform", 20, T).tolist() == list(range(951, 0, -50))
    quad = spaced_timesteps("quad", 5, T)
    assert quad.tolist() == (np.linspace(0, np.sqrt(800), 5) ** 2).astype(int)[::-1].__add__(1).tolist()
    np.testing.assert_array_equal(module_util.make_ddim_timesteps("uniform", 4, T), [1, 251, 501, 751])
    # the original DDIM's last level is alpha_bar_0: final="min"
    s = sd_schedule()
    levels = spacing("uniform", 20, s, final="min")
    assert levels[-1] == s.sigmas[0] and torch.equal(levels[:-1], s.sigmas[list(range(951, 0, -50))])
    with pytest.raises(ValueError, match="reach timestep 1000"):
        spaced_timesteps("uniform", 3, T)


@pytest.mark.parametrize("n", [5, 20])
def test_karras_and_exponential_equal_k_diffusion_and_diffusers(kd, n: int) -> None:
    s = sd_schedule()
    ks = kd.sampling
    torch.testing.assert_close(spacing("karras", n, s), ks.get_sigmas_karras(n, s.sigma_min, s.sigma_max).double(),
                               rtol=KD_RTOL, atol=0)
    torch.testing.assert_close(spacing("exponential", n, s),
                               ks.get_sigmas_exponential(n, s.sigma_min, s.sigma_max).double(), rtol=KD_RTOL, atol=0)
    torch.testing.assert_close(spacing("karras", n, s, rho=3.0, sigma_max=4.0),
                               ks.get_sigmas_karras(n, s.sigma_min, 4.0, rho=3.0).double(), rtol=KD_RTOL, atol=0)
    ref = kd.external.DiscreteSchedule(s.sigmas, quantize=False)
    # k-diffusion's get_sigmas: linspace timesteps (made in float32 there), log-linear interpolation of the levels
    torch.testing.assert_close(spacing("linspace", n, s), ref.get_sigmas(n), rtol=KD_RTOL, atol=0)
    edm = EDMSchedule()
    torch.testing.assert_close(spacing("karras", n, edm), ks.get_sigmas_karras(n, 0.002, 80.0, 7.0).double(),
                               rtol=KD_RTOL, atol=0)
    for option, kind in (("use_karras_sigmas", "karras"), ("use_exponential_sigmas", "exponential")):
        sched = diffusers.EulerDiscreteScheduler(**DIFFUSERS_SD, **{option: True})
        sched.set_timesteps(n)
        torch.testing.assert_close(spacing(kind, n, s).float(), sched.sigmas, rtol=F32_RTOL, atol=0)


def test_spacing_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="spacing 'cubic' unknown"):
        spacing("cubic", 10, sd_schedule())
    with pytest.raises(ValueError, match="pure noise, pass sigma_max"):
        spacing("karras", 10, sd_schedule(zero_terminal_snr=True))
    assert float(spacing("karras", 10, sd_schedule(zero_terminal_snr=True), sigma_max=4096.0)[0]) == pytest.approx(4096)
    with pytest.raises(ValueError, match="final 'end' unknown"):
        spacing("karras", 10, sd_schedule(), final="end")
    with pytest.raises(ValueError, match="at least 1"):
        spacing("trailing", 0, sd_schedule())


def test_trailing_on_zero_snr_starts_from_pure_noise() -> None:
    levels = spacing("trailing", 10, sd_schedule(zero_terminal_snr=True))
    assert math.isinf(float(levels[0])) and bool(torch.isfinite(levels[1:]).all()) and levels[-1] == 0


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_schedule(shift: float) -> None:
    flow = FlowSchedule(shift=shift)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(flow.unwarp(flow.warp(t)), t)
    torch.testing.assert_close(flow.warp(t), shift * t / (1 + (shift - 1) * t))
    s = FlowSchedule.level(t)
    alpha, sigma = flow.alpha_sigma(s)
    torch.testing.assert_close(alpha, 1 - t)
    torch.testing.assert_close(sigma, t)
    torch.testing.assert_close(flow.model_time(s), t * 1000)
    assert math.isinf(flow.sigma_max) and flow.sigma_min == pytest.approx(float(FlowSchedule.level(flow.warp(1 / T))))
    grid = torch.arange(T, dtype=torch.float64)
    torch.testing.assert_close(flow.sigma_to_t(flow.t_to_sigma(grid[:-1])), grid[:-1])
    # diffusers' FlowMatchEulerDiscreteScheduler: sigma (= our flow time) from 1 to its sigma_min, then shifted
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    sched.set_timesteps(20)
    ours = flow.flow_time(spacing("linspace", 20, flow))
    torch.testing.assert_close(ours[:-1], flow.warp(torch.linspace(1, 1 / T, 20, dtype=torch.float64)))
    if shift == 1.0:
        torch.testing.assert_close(ours.float(), sched.sigmas, rtol=1e-6, atol=1e-7)
    else:  # diffusers ends its linspace at its already shifted sigma_min and shifts once more
        low = float(flow.warp(1 / T))
        torch.testing.assert_close(flow.warp(torch.linspace(1, low, 20)).float(), sched.sigmas[:-1], rtol=1e-6, atol=0)


def test_edm_schedule() -> None:
    edm = EDMSchedule(sigma_min=0.01, sigma_max=50.0, sigma_data=0.6, rho=5.0)
    s = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    alpha, sigma = edm.alpha_sigma(s)
    assert torch.equal(alpha, torch.ones(3, dtype=torch.float64)) and torch.equal(sigma, s)
    torch.testing.assert_close(edm.model_time(s), s.log() / 4)
    assert edm.t_to_sigma(0.0) == pytest.approx(0.01) and edm.t_to_sigma(999.0) == pytest.approx(50.0)
    torch.testing.assert_close(edm.sigma_to_t(edm.t_to_sigma(torch.arange(1000.0))), torch.arange(1000.0).double())
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        EDMSchedule(sigma_min=2.0, sigma_max=1.0)


@pytest.mark.parametrize("schedule", [sd_schedule(), sd_schedule(zero_terminal_snr=True), FlowSchedule(shift=3.0),
                                      EDMSchedule()], ids=["vp", "vp-zsnr", "flow", "edm"])
def test_every_process_noises_as_x_over_alpha_equals_x0_plus_s_eps(schedule) -> None:
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 2, 2, generator=gen), torch.randn(4, 3, 2, 2, generator=gen)
    t = torch.tensor([0, 10, 500, 998])
    s = schedule.t_to_sigma(t)
    x_t = schedule.q_sample(x0, t, eps)
    alpha, sigma = schedule.coefficients(t, x0)
    torch.testing.assert_close(x_t, alpha * x0 + sigma * eps)
    torch.testing.assert_close(x_t / alpha, x0 + s.float().reshape(-1, 1, 1, 1) * eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(schedule.add_noise(x0, s, eps), x_t)


def test_noise_schedule_q_sample_equals_diffusers_add_noise() -> None:
    s, ref = sd_schedule(), diffusers.DDPMScheduler(**DIFFUSERS_SD)
    gen = torch.Generator().manual_seed(0)
    x0, eps, t = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen), torch.tensor([0, 500, 999])
    # diffusers computes sqrt(alpha_bar) from float32 alpha_bar: ~1e-6 absolute on unit-scale latents
    torch.testing.assert_close(s.q_sample(x0, t, eps), ref.add_noise(x0, eps, t), rtol=1e-5, atol=5e-6)


def test_build_schedule_from_a_process_config() -> None:
    vp = dict(beta_schedule="linear", timesteps=T, linear_start=0.00085, linear_end=0.012)
    assert torch.equal(build_schedule(None, **vp).betas, sd_schedule().betas)
    zsnr = build_schedule({"target": "ldm.sampling.schedule.NoiseSchedule", "params": {"zero_terminal_snr": True}}, **vp)
    assert torch.equal(zsnr.betas, sd_schedule(zero_terminal_snr=True).betas)
    flow = build_schedule({"target": "ldm.sampling.schedule.FlowSchedule", "params": {"shift": 3.0}}, **vp)
    assert flow == FlowSchedule(shift=3.0)
    assert build_schedule({"target": "ldm.sampling.schedule.EDMSchedule"}, **vp) == EDMSchedule()
    with pytest.raises(ValueError, match="needs a 'target'"):
        build_schedule({"params": {}}, **vp)
    with pytest.raises(ValueError, match="is not a ldm.sampling.schedule.Schedule"):
        build_schedule({"target": "ldm.sampling.noise.SeededNoise"}, **vp)
