"""DPM++ 2S ancestral, SDE, 2M SDE, 3M SDE and UniPC against k-diffusion and diffusers on the same model and noise;
the Brownian-tree noise option; steps from pure noise; UniPC's coefficients, options and orders of accuracy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.sampling import Denoiser, SeededNoise
from ldm.sampling.guidance import guided_model_fn
from ldm.sampling.noise import BrownianTreeNoise
from ldm.sampling.samplers.dpmpp_sde import dpmpp_2m_sde, dpmpp_2s_ancestral, dpmpp_3m_sde, dpmpp_sde
from ldm.sampling.samplers.unipc import unipc, unipc_coefficients
from ldm.sampling.schedule import FlowSchedule, NoiseSchedule, spacing

import diffusers  # the test-only reference (setup.py test extra): missing, the suite fails

T = 1000
SD_BETAS = dict(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
VP = NoiseSchedule.from_config("linear", T, linear_start=0.00085, linear_end=0.012)
PARAM = {"epsilon": "eps", "v_prediction": "v"}
SHAPE = (2, 4, 8, 8)
TOL = 1e-5
SAMPLERS = {"dpmpp_2s_ancestral": dpmpp_2s_ancestral, "dpmpp_sde": dpmpp_sde, "dpmpp_2m_sde": dpmpp_2m_sde,
            "dpmpp_3m_sde": dpmpp_3m_sde}
WITH_UNIPC = {**SAMPLERS, "unipc": unipc}


def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic nonlinear stand-in for a network, depending on x, t and neighbouring pixels."""
    tt = t.to(x.dtype).reshape(-1, 1, 1, 1) / T
    return torch.tanh(0.8 * x + torch.sin(6 * tt)) * (0.6 + tt) + 0.2 * x.roll(1, dims=-1) * torch.cos(3 * tt)


def x_T(dtype: torch.dtype = torch.float32, batch: int = SHAPE[0]) -> torch.Tensor:
    return torch.randn(batch, *SHAPE[1:], generator=torch.Generator().manual_seed(0), dtype=dtype)


def draws(n: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(*SHAPE, generator=gen, dtype=dtype) for _ in range(n)]


class ListNoise:
    """A noise source handing out pre-drawn tensors in order (the reference samplers get the same list)."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors, self.used = list(tensors), 0

    def randn(self, shape, dtype=torch.float32) -> torch.Tensor:
        z = self.tensors[self.used]
        self.used += 1
        assert tuple(z.shape) == tuple(shape)
        return z.to(dtype)

    def sampler(self):
        """The same list as a k-diffusion noise_sampler(sigma, sigma_next)."""
        return lambda sigma, sigma_next: self.randn(self.tensors[0].shape)


def rel_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


# ----------------------------------------------------------------------------------------- k-diffusion
K_CASES = [
    ("dpmpp_2s_ancestral", {}), ("dpmpp_2s_ancestral", {"eta": 0.5}),
    ("dpmpp_sde", {}), ("dpmpp_sde", {"r": 0.3, "eta": 0.7}),
    ("dpmpp_2m_sde", {}), ("dpmpp_2m_sde", {"solver_type": "heun"}), ("dpmpp_2m_sde", {"eta": 0.5}),
    ("dpmpp_3m_sde", {}), ("dpmpp_3m_sde", {"eta": 0.0}), ("dpmpp_3m_sde", {"s_noise": 0.8}),
]


@pytest.mark.parametrize("name,options", K_CASES)
@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_matches_k_diffusion_on_the_same_noise(kd, name: str, options: dict, parameterization: str) -> None:
    denoise = Denoiser(model_fn, VP, parameterization)
    sigmas = kd.sampling.get_sigmas_karras(12, VP.sigma_min, VP.sigma_max)
    x = x_T() * sigmas[0]
    ours_noise, their_noise = ListNoise(draws(30)), ListNoise(draws(30))
    ours = SAMPLERS[name](denoise, sigmas, x, noise=ours_noise, **options)
    theirs = getattr(kd.sampling, f"sample_{name}")(denoise, x, sigmas, noise_sampler=their_noise.sampler(),
                                                   disable=True, **options)
    assert rel_diff(ours, theirs) <= TOL
    assert ours_noise.used == their_noise.used


@pytest.mark.parametrize("name", ["dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_brownian_noise_matches_k_diffusion_brownian_tree_noise_sampler(kd, name: str) -> None:
    """The same per-sample trees (float64: dpmpp_sde asks the tree at its intermediate levels, which rounding in
    float32 moves by an ulp -- enough to change a Brownian increment at 1e-5)."""
    denoise = Denoiser(model_fn, VP, "v")
    sigmas = kd.sampling.get_sigmas_karras(10, VP.sigma_min, VP.sigma_max).double()
    x = x_T(torch.float64) * sigmas[0]
    seeds = [7, 8]
    ours = SAMPLERS[name](denoise, sigmas, x, noise=SeededNoise(seeds), brownian=True)
    tree = kd.sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds)
    theirs = getattr(kd.sampling, f"sample_{name}")(denoise, x, sigmas, noise_sampler=tree, disable=True)
    assert rel_diff(ours, theirs) <= 1e-10


# ----------------------------------------------------------------------------------------- diffusers
def run_diffusers(scheduler, x: torch.Tensor, fn=model_fn, noises: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The usual diffusers loop: model output at each scheduler timestep, then scheduler.step."""
    x = x * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        out = fn(scheduler.scale_model_input(x, t), t.expand(x.shape[0]))
        kwargs = {} if noises is None else {"variance_noise": noises[i]}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


def diffusers_multistep(prediction_type: str, steps: int, **config) -> "diffusers.DPMSolverMultistepScheduler":
    scheduler = diffusers.DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="sde-dpmsolver++",
                                                      prediction_type=prediction_type, **config)
    scheduler.set_timesteps(steps)
    return scheduler


def run_ours_on(scheduler, fn, sampler, parameterization: str, noise, **options) -> torch.Tensor:
    """Our sampler on the scheduler's levels, from the same x_T (VP scale), the model seeing its integer timesteps."""
    sigmas = scheduler.sigmas.double()
    denoise = Denoiser(fn, VP, parameterization, quantize_time=True)
    return sampler(denoise, sigmas, VP.to_ve(x_T(), sigmas[0]), noise=noise, **options)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_2m_sde_matches_diffusers_sde_dpmsolver_pp(prediction_type: str, steps: int, karras: bool,
                                                   solver_type: str) -> None:
    scheduler = diffusers_multistep(prediction_type, steps, solver_order=2, solver_type=solver_type,
                                    use_karras_sigmas=karras)
    noises = draws(steps)
    theirs = run_diffusers(scheduler, x_T(), noises=noises)
    ours = run_ours_on(scheduler, model_fn, dpmpp_2m_sde, PARAM[prediction_type], ListNoise(noises),
                       solver_type=solver_type, lower_order_final=True)
    assert rel_diff(ours, theirs) <= TOL


def affine_model(prediction_type: str):
    """A network whose clean-sample prediction is affine in lambda = -log(sigma) at the table's timesteps:
    D = A + B lambda_t, so the second difference of D vanishes."""
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(1, *SHAPE[1:], generator=gen) * 0.5, torch.randn(1, *SHAPE[1:], generator=gen) * 0.1
    alpha_bar = VP.alphas_cumprod

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = alpha_bar[t.long()].float().reshape(-1, 1, 1, 1)
        x0 = a + b * 0.5 * torch.log(ab / (1 - ab))
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        return eps if prediction_type == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * x0

    return fn


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_3m_sde_matches_diffusers_solver_order_3_where_d_has_no_curvature(prediction_type: str, steps: int,
                                                                          solver_type: str) -> None:
    """diffusers' third-order sde-dpmsolver++ update weighs the second difference D2 by
    (1 - e^-2h - 2h) / (2h)^2 - 1/2; k-diffusion's sample_dpmpp_3m_sde (and ours, and diffusers' own ODE update
    at eta = 0) by -(phi_3) = (1 - e^-2h - 2h) / (2h)^2 + 1/2. On a model without curvature in lambda (D2 = 0) the
    two must agree: warm-up orders, the lower-order final steps of fewer than 15, the first differences and the
    noise."""
    fn = affine_model(prediction_type)
    scheduler = diffusers_multistep(prediction_type, steps, solver_order=3, solver_type=solver_type)
    noises = draws(steps)
    theirs = run_diffusers(scheduler, x_T(), fn, noises)
    ours = run_ours_on(scheduler, fn, dpmpp_3m_sde, PARAM[prediction_type], ListNoise(noises),
                       solver_type=solver_type, lower_order_final=True)
    assert rel_diff(ours, theirs) <= TOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("karras", [False, True])
def test_sde_matches_diffusers_dpm_solver_sde_scheduler(prediction_type: str, karras: bool) -> None:
    """DPMSolverSDEScheduler is k-diffusion's DPM++ SDE (r = 1/2) stepping twice per level; its Brownian noise
    sampler is swapped for the shared list (its float32 intermediate levels would move our tree's increments)."""
    scheduler = diffusers.DPMSolverSDEScheduler(**SD_BETAS, prediction_type=prediction_type, use_karras_sigmas=karras)
    scheduler.set_timesteps(10)
    theirs_noise = ListNoise(draws(20))
    scheduler.noise_sampler = theirs_noise.sampler()
    theirs = run_diffusers(scheduler, x_T())
    sigmas = torch.unique_consecutive(scheduler.sigmas).double()  # the scheduler repeats the inner levels
    ours_noise = ListNoise(draws(20))
    ours = dpmpp_sde(Denoiser(model_fn, VP, PARAM[prediction_type]), sigmas, x_T() * scheduler.init_noise_sigma,
                     noise=ours_noise)
    assert rel_diff(ours, theirs) <= TOL and ours_noise.used == theirs_noise.used == 18


# ----------------------------------------------------------------------------------------- our own properties
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_brownian_samples_do_not_depend_on_the_batch(name: str) -> None:
    denoise = Denoiser(model_fn, VP, "eps")
    sigmas = spacing("karras", 8, VP)
    seeds = [21, 22, 23]
    batch = SAMPLERS[name](denoise, sigmas, SeededNoise(seeds).randn((3, *SHAPE[1:])) * sigmas[0],
                           noise=SeededNoise(seeds), brownian=True)
    alone = SAMPLERS[name](denoise, sigmas, SeededNoise([22]).randn((1, *SHAPE[1:])) * sigmas[0],
                           noise=BrownianTreeNoise([22]))
    torch.testing.assert_close(alone[0], batch[1], atol=1e-6, rtol=0)
    plain = SAMPLERS[name](denoise, sigmas, SeededNoise(seeds).randn((3, *SHAPE[1:])) * sigmas[0],
                           noise=SeededNoise(seeds))
    assert not torch.allclose(plain, batch)  # the tree's increments, not the generators' draws


def test_brownian_noise_makes_the_sde_converge_with_the_step_count() -> None:
    """With one Brownian path per sample, 2M SDE runs of 40 and 80 steps solve the same SDE realisation and end
    close together; with fresh draws per step they are two different samples."""
    denoise = Denoiser(model_fn, VP, "eps")
    start = SeededNoise([3, 4]).randn(SHAPE)

    def run(steps: int, brownian: bool) -> torch.Tensor:
        sigmas = spacing("karras", steps, VP)
        return dpmpp_2m_sde(denoise, sigmas, start * sigmas[0], noise=SeededNoise([3, 4]), brownian=brownian)

    tree = float((run(40, True) - run(80, True)).abs().mean())
    fresh = float((run(40, False) - run(80, False)).abs().mean())
    assert tree < 0.2 * fresh


@pytest.mark.parametrize("name,options", [("dpmpp_2s_ancestral", {"eta": 0.0}), ("dpmpp_sde", {"eta": 0.0}),
                                          ("dpmpp_2m_sde", {"eta": 0.0}), ("dpmpp_3m_sde", {"eta": 0.0}),
                                          ("dpmpp_2m_sde", {}), ("dpmpp_3m_sde", {})])
def test_an_infinite_first_level_is_the_limit_of_a_finite_one(name: str, options: dict) -> None:
    """From pure noise (flow at t = 1) the first step is the limit sigma_max -> inf of the finite one (with eta > 0
    the start noise fades out of the multistep SDE step and only the fresh draw is left)."""
    flow = FlowSchedule(shift=3.0)
    denoise, start = Denoiser(model_fn, flow, "flow"), x_T()
    sigmas = spacing("linspace", 8, flow)
    exact = SAMPLERS[name](denoise, sigmas, start, noise=ListNoise(draws(16)), **options)
    errors = []
    for big in (1e4, 1e8):
        finite = sigmas.clone()
        finite[0] = big
        approx = SAMPLERS[name](denoise, finite, flow.to_ve(start, big), noise=ListNoise(draws(16)), **options)
        errors.append(float((approx - exact).abs().max()))
    if "m_sde" in name:  # the multistep corrections weigh the first step by h / h_first: they fade like 1 / log(sigma)
        assert errors[1] < 0.75 * errors[0]
    else:  # single-step: the difference falls like 1 / sigma
        assert errors[1] < 1e-3 and errors[1] < errors[0] / 20


@pytest.mark.parametrize("name", sorted(WITH_UNIPC))
@pytest.mark.parametrize("process,parameterization", [("vp", "x0"), ("flow", "flow")])
def test_runs_for_x0_and_flow_models_with_guidance_and_a_mask(name: str, process: str, parameterization: str) -> None:
    """(The registry-wide tests of test_samplers.py check the mask's region and every process on exact models.)"""
    schedule = VP if process == "vp" else FlowSchedule(shift=3.0)

    def network(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return model_fn(x, t) * 0.5 + c.reshape(-1, 1, 1, 1)

    cond, uncond = torch.full((2,), 0.3), torch.zeros(2)
    denoise = Denoiser(guided_model_fn(network, cond, uncond, 4.0), schedule, parameterization)
    mask = torch.zeros(SHAPE)
    mask[..., :4] = 1
    known = x_T(batch=2).clamp(-1, 1) * 0.5
    sigmas = spacing("linspace" if process == "flow" else "karras", 10, schedule)
    out = WITH_UNIPC[name](denoise, sigmas, schedule.to_ve(x_T(), sigmas[0]), noise=SeededNoise([1, 2]), mask=mask,
                         x0=known)
    assert torch.isfinite(out).all()
    free = WITH_UNIPC[name](denoise, sigmas, schedule.to_ve(x_T(), sigmas[0]), noise=SeededNoise([1, 2]))
    assert not torch.allclose(out, free)  # the pasted region reached the model
    guided = Denoiser(guided_model_fn(network, cond, uncond, 1.0), schedule, parameterization)
    assert not torch.allclose(free, WITH_UNIPC[name](guided, sigmas, schedule.to_ve(x_T(), sigmas[0]),
                                                   noise=SeededNoise([1, 2])))


def test_clear_errors() -> None:
    denoise, sigmas = Denoiser(model_fn, VP, "eps"), spacing("karras", 4, VP)
    with pytest.raises(ValueError, match="solver_type 'bh2' unknown; expected one of midpoint, heun"):
        dpmpp_2m_sde(denoise, sigmas, x_T() * sigmas[0], solver_type="bh2")
    with pytest.raises(ValueError, match=r"r must lie in \(0, 1\]"):
        dpmpp_sde(denoise, sigmas, x_T() * sigmas[0], r=0.0)


# ----------------------------------------------------------------------------------------- UniPC
def diffusers_unipc(prediction_type: str, steps: int, x: torch.Tensor, **config) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' result (VP scale) and its levels."""
    scheduler = diffusers.UniPCMultistepScheduler(**SD_BETAS, prediction_type=prediction_type, **config)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(model_fn(x, t.expand(x.shape[0])), t, x).prev_sample
    return x, scheduler.sigmas.double()


def ours_on(sigmas: torch.Tensor, prediction_type: str, **options) -> torch.Tensor:
    """Our UniPC on the same levels from the same x_T, the model seeing integer timesteps; back in VP scale."""
    denoise = Denoiser(model_fn, VP, PARAM[prediction_type], quantize_time=True)
    out = unipc(denoise, sigmas, VP.to_ve(x_T(), sigmas[0]), **options)
    return VP.from_ve(out, sigmas[-1])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("steps", [8, 20])
def test_bh2_matches_diffusers(prediction_type: str, order: int, karras: bool, steps: int) -> None:
    theirs, sigmas = diffusers_unipc(prediction_type, steps, x_T(), solver_type="bh2", solver_order=order,
                                     use_karras_sigmas=karras)
    assert rel_diff(ours_on(sigmas, prediction_type, order=order, solver_type="bh2"), theirs) <= TOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [8, 20])
def test_bh1_matches_diffusers(prediction_type: str, order: int, steps: int) -> None:
    """bh1 against diffusers ending on sigma_min: its step to 0 computes B(h) * 0 with B(h) = -inf and returns NaN
    (ours takes that step's limit, D)."""
    theirs, sigmas = diffusers_unipc(prediction_type, steps, x_T(), solver_type="bh1", solver_order=order,
                                     final_sigmas_type="sigma_min")
    assert rel_diff(ours_on(sigmas, prediction_type, order=order, solver_type="bh1"), theirs) <= TOL
    nan, zero_sigmas = diffusers_unipc(prediction_type, steps, x_T(), solver_type="bh1", solver_order=order)
    clean = ours_on(zero_sigmas, prediction_type, order=order, solver_type="bh1")
    assert torch.isnan(nan).all() and torch.isfinite(clean).all()


@pytest.mark.parametrize("options", [{"lower_order_final": False, "final_sigmas_type": "sigma_min"},
                                     {"disable_corrector": [0, 3]}])
def test_options_match_diffusers(options: dict) -> None:
    config = {"final_sigmas_type": options.get("final_sigmas_type", "zero")}
    ours_options = {k: v for k, v in options.items() if k != "final_sigmas_type"}
    theirs, sigmas = diffusers_unipc("epsilon", 10, x_T(), solver_order=3, **config, **ours_options)
    assert rel_diff(ours_on(sigmas, "epsilon", order=3, **ours_options), theirs) <= TOL
    assert rel_diff(ours_on(sigmas, "epsilon", order=3), theirs) > 1e-3  # the option mattered


def test_coefficients_reduce_to_the_exponential_integrator() -> None:
    """UniP-1 is DDIM / DPM-Solver++(1) (no correction terms); UniC-1's rho is 1/2 and with bh2 its B(h) is
    e^-h - 1; the UniC-2 system solves the 2x2 Vandermonde system R rho = b."""
    h = 0.4
    b_h, rhos = unipc_coefficients(h, [], 1, "bh2", corrector=False)
    assert rhos == [] and math.isclose(b_h, math.expm1(-h))
    b_h, rhos = unipc_coefficients(h, [], 1, "bh1", corrector=True)
    assert rhos == [0.5] and b_h == -h
    r = -0.8
    b_h, rhos = unipc_coefficients(h, [r], 2, "bh2", corrector=True)
    hh = -h
    phi2 = math.expm1(hh) / hh - 1
    phi3 = phi2 / hh - 0.5
    b = np.array([phi2 / b_h, 2 * phi3 / b_h])
    np.testing.assert_allclose(np.array([[1, 1], [r, 1]]) @ np.array(rhos), b, rtol=1e-12)


@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
def test_orders_of_accuracy_on_an_exact_gaussian_model(solver_type: str) -> None:
    """For data N(mu, std^2) the probability-flow ODE keeps (x - mu) / sqrt(std^2 + sigma^2) constant. UniPC-p
    with its corrector is of order p + 1 (Zhao et al. 2023, Theorem 3.1): doubling the steps divides the error of
    UniPC-1 by ~4 and of UniPC-2 by ~8; at one step count the error falls with the order."""
    mu, std = 0.3, 0.5

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        return mu + std**2 / (std**2 + s**2) * (x - mu)

    def error(order: int, steps: int) -> float:
        sigmas = spacing("exponential", steps, VP, final="none")
        start = x_T().double() * sigmas[0]
        exact = mu + (start - mu) * math.sqrt((std**2 + sigmas[-1] ** 2) / (std**2 + sigmas[0] ** 2))
        return float((unipc(denoise, sigmas, start, order=order, solver_type=solver_type) - exact).abs().max())

    errors = {(k, n): error(k, n) for k in (1, 2, 3) for n in (20, 40)}
    assert math.log2(errors[1, 20] / errors[1, 40]) > 1.8
    assert math.log2(errors[2, 20] / errors[2, 40]) > 2.6
    assert errors[3, 20] < errors[2, 20] < errors[1, 20]


def test_from_pure_noise_the_first_step_is_first_order_and_uncorrected() -> None:
    """From an infinite level (flow at t = 1) the first step is D + sigma_1 x_T, and the run goes on as a fresh one
    from there: no corrector and no history reach back to the level without a finite log-SNR."""
    flow = FlowSchedule(shift=3.0)
    denoise, start = Denoiser(model_fn, flow, "flow"), x_T()
    sigmas = spacing("linspace", 8, flow)
    first = denoise(start, math.inf) + float(sigmas[1]) * start
    for order in (1, 3):
        torch.testing.assert_close(unipc(denoise, sigmas, start, order=order),
                                   unipc(denoise, sigmas[1:], first, order=order), atol=1e-6, rtol=0)


def test_unipc_clear_errors() -> None:
    denoise, sigmas = Denoiser(model_fn, VP, "eps"), spacing("karras", 4, VP)
    with pytest.raises(ValueError, match="solver_type 'midpoint' unknown; expected one of bh1, bh2"):
        unipc(denoise, sigmas, x_T() * sigmas[0], solver_type="midpoint")
    with pytest.raises(ValueError, match="order must be 1, 2 or 3, got 4"):
        unipc(denoise, sigmas, x_T() * sigmas[0], order=4)
