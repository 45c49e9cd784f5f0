"""The sampler contract, checked for every sampler of the registry on closed-form and nonlinear toy models.

Each registered sampler (ldm.sampling.SAMPLERS) must land an exact model of a point mass on it for every
parameterization and process (including an infinite first level), report every step, keep the inpainting region,
and -- when stochastic -- draw batch-invariant per-sample noise.
"""
from __future__ import annotations

import math

import pytest
import torch

from ldm.sampling import SAMPLERS, Denoiser, SeededNoise
from ldm.sampling.parameterization import training_target
from ldm.sampling.samplers.ddim import ddim, ddim_inversion
from ldm.sampling.samplers.plms import adams_bashforth
from ldm.sampling.schedule import EDMSchedule, FlowSchedule, NoiseSchedule, spacing

T = 1000
SHAPE = (2, 4, 8, 8)
VP = NoiseSchedule.from_config("linear", T, linear_start=0.00085, linear_end=0.012)
VP_ZSNR = NoiseSchedule.from_config("linear", T, linear_start=0.00085, linear_end=0.012, zero_terminal_snr=True)
FLOW = FlowSchedule(shift=3.0)
EDM = EDMSchedule()
MU = torch.linspace(-0.9, 0.9, math.prod(SHAPE[1:])).reshape(SHAPE[1:])
NAMES = sorted(SAMPLERS)
STOCHASTIC = [name for name in NAMES if SAMPLERS[name].stochastic]


def level(schedule, time: torch.Tensor) -> torch.Tensor:
    """The VE level of a network time input (the inverse of schedule.model_time)."""
    time = time.double().cpu()
    if isinstance(schedule, FlowSchedule):
        return FlowSchedule.level(time / 1000)
    if isinstance(schedule, EDMSchedule):
        return (4 * time).exp()
    return schedule.t_to_sigma(time)


def gaussian_model(schedule, parameterization: str, std: float = 0.0) -> Denoiser:
    """The exact network for data x0 ~ N(MU, std^2 I) (std=0: a point mass), answering in `parameterization`:
    E[x0 | x] = MU + std^2 / (std^2 + s^2) (x - MU) on the VE-normalised x."""
    def fn(net_in: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        s = level(schedule, time)
        alpha, sigma = (v.reshape(-1, 1, 1, 1).float() for v in schedule.alpha_sigma(s))
        x_t = net_in  # (no edm models here: the network input is x_t)
        gain = (std**2 / (std**2 + s**2)).reshape(-1, 1, 1, 1).float()
        x0 = MU + torch.where(alpha > 0, gain * (x_t / alpha.clamp(min=1e-30) - MU), torch.zeros_like(x_t))
        return training_target(parameterization, x0, (x_t - alpha * x0) / sigma, alpha, sigma)

    return Denoiser(fn, schedule, parameterization)


def nonlinear(schedule=VP, parameterization: str = "eps") -> Denoiser:
    """A deterministic nonlinear per-pixel network."""
    def fn(net_in: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        tt = (time.double() / (T if isinstance(schedule, NoiseSchedule) else 1000)).float().reshape(-1, 1, 1, 1)
        return torch.tanh(0.8 * net_in + torch.sin(6 * tt)) * (0.6 + tt)

    return Denoiser(fn, schedule, parameterization)


def noise_like(batch: int = SHAPE[0], seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *SHAPE[1:], generator=torch.Generator().manual_seed(seed))


def ladder(name: str, schedule, steps: int = 12) -> torch.Tensor:
    """The sampler's default spacing on a finite schedule, trailing / linspace where the first level is pure noise."""
    kind = SAMPLERS[name].spacing
    if math.isinf(schedule.sigma_max):
        kind = "trailing" if isinstance(schedule, NoiseSchedule) else "linspace"
    return spacing(kind, steps, schedule)


def run(name: str, denoise: Denoiser, x_T: torch.Tensor, schedule=VP, steps: int = 12, **kwargs) -> torch.Tensor:
    """Sample from pure noise x_T (process scale) down to a clean sample with the sampler's default ladder."""
    sigmas = ladder(name, schedule, steps)
    return SAMPLERS[name].fn(denoise, sigmas, schedule.to_ve(x_T, sigmas[0]), **kwargs)


class ZeroNoise:
    def randn(self, shape, dtype=torch.float32):
        return torch.zeros(tuple(shape), dtype=dtype)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("process,parameterization", [
    ("vp", "eps"), ("vp", "x0"), ("vp", "v"), ("zsnr", "v"), ("zsnr", "x0"), ("flow", "flow"), ("flow", "v"),
])
def test_exact_model_of_a_point_mass_lands_on_it(name: str, process: str, parameterization: str) -> None:
    schedule = {"vp": VP, "zsnr": VP_ZSNR, "flow": FLOW}[process]
    out = run(name, gaussian_model(schedule, parameterization), noise_like(), schedule)
    torch.testing.assert_close(out, MU.expand(SHAPE), atol=2e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_callback_sees_every_step_and_the_result(name: str) -> None:
    seen: list[dict] = []
    out = run(name, nonlinear(), noise_like(), callback=seen.append)
    sigmas = ladder(name, VP).tolist()
    assert [s["i"] for s in seen] == list(range(len(sigmas) - 1))
    assert [s["sigma"] for s in seen] == sigmas[:-1] and [s["sigma_next"] for s in seen] == sigmas[1:]
    assert torch.equal(seen[-1]["x"], out) and seen[-1]["denoised"].shape == out.shape


@pytest.mark.parametrize("name", NAMES)
def test_inpainting_with_full_mask_returns_x0(name: str) -> None:
    known = noise_like(seed=5).clamp(-1, 1)
    seen: list[dict] = []
    out = run(name, nonlinear(), noise_like(), mask=torch.ones(SHAPE), x0=known, callback=seen.append)
    # pasted in before the last step's evaluation: what is left is of the order of that level
    assert (out - known).abs().max() <= 6 * seen[-1]["sigma"]
    free = run(name, nonlinear(), noise_like())
    assert (free - known).abs().max() > 10 * seen[-1]["sigma"]


@pytest.mark.parametrize("name", NAMES)
def test_inpainting_with_empty_mask_is_the_unmasked_run(name: str) -> None:
    # the inpainting noise is drawn from the same source, so stochastic samplers get a silent one here
    noise = ZeroNoise() if SAMPLERS[name].stochastic else None
    plain = run(name, nonlinear(), noise_like(), noise=noise)
    masked = run(name, nonlinear(), noise_like(), noise=noise, mask=torch.zeros(SHAPE), x0=noise_like(seed=9))
    torch.testing.assert_close(masked, plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_seeded_samples_do_not_depend_on_the_batch(name: str) -> None:
    seeds = [11, 12, 13, 14, 15, 16, 17, 18]
    batch = run(name, nonlinear(), SeededNoise(seeds).randn((8, *SHAPE[1:])), noise=SeededNoise(seeds))
    for i in (0, 5):
        alone = run(name, nonlinear(), SeededNoise([seeds[i]]).randn((1, *SHAPE[1:])), noise=SeededNoise([seeds[i]]))
        torch.testing.assert_close(alone[0], batch[i], atol=1e-6, rtol=0)
    assert not torch.allclose(batch[0], batch[1])
    other = run(name, nonlinear(), SeededNoise(seeds).randn((8, *SHAPE[1:])), noise=SeededNoise([s + 100 for s in seeds]))
    assert not torch.allclose(other, batch)  # the step noise matters, not only the start


@pytest.mark.parametrize("name", [name for name in NAMES if not SAMPLERS[name].stochastic])
def test_deterministic_samplers_draw_no_noise(name: str) -> None:
    runs = [run(name, nonlinear(), noise_like(), noise=SeededNoise(seeds)) for seeds in ([1, 2], [3, 4])]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("name,options", [("ddim", {"eta": 1.0}), ("ddpm", {})])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_temperature_and_noise_dropout(name: str, options: dict, dropout: float) -> None:
    cold = [run(name, nonlinear(), noise_like(), noise=SeededNoise(s), temperature=0.0, noise_dropout=dropout,
                **options) for s in ([1, 2], [3, 4])]
    warm = run(name, nonlinear(), noise_like(), noise=SeededNoise([3, 4]), noise_dropout=dropout, **options)
    assert torch.equal(cold[0], cold[1]) and not torch.allclose(cold[0], warm)


@pytest.mark.parametrize("name", ["ddim", "euler", "euler_ancestral", "dpmpp_2m"])
def test_an_infinite_first_level_is_the_limit_of_a_finite_one(name: str) -> None:
    """From pure noise (flow at t = 1) the first step is the limit sigma_max -> inf of the finite one."""
    denoise, x_T = nonlinear(FLOW, "flow"), noise_like()
    sigmas = spacing("linspace", 8, FLOW)
    exact = SAMPLERS[name].fn(denoise, sigmas, x_T, noise=ZeroNoise())
    errors = []
    for big in (1e2, 1e4):
        finite = sigmas.clone()
        finite[0] = big
        approx = SAMPLERS[name].fn(denoise, finite, FLOW.to_ve(x_T, big), noise=ZeroNoise())
        errors.append(float((approx - exact).abs().max()))
    if name == "dpmpp_2m":  # the 2M correction weighs the previous step by h / h_last: it fades like 1 / log(sigma)
        assert errors[1] < 0.7 * errors[0]
    else:  # first-order steps: the difference falls like 1 / sigma
        assert errors[1] < 1e-3 and errors[1] < errors[0] / 20


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_ddim_inversion_then_ddim_returns_the_input(parameterization: str) -> None:
    denoise = gaussian_model(VP, parameterization, std=0.5)
    x0 = MU + 0.5 * noise_like(seed=3)
    errors = []
    for n in (50, 100):
        sigmas = spacing("uniform", n, VP, final="min")
        latent = ddim_inversion(denoise, sigmas.flip(0), x0, schedule=VP)
        assert (VP.from_ve(latent, sigmas[0])).std() > 0.9  # it did reach (nearly) pure noise
        back = ddim(denoise, sigmas, latent)
        errors.append(float((back - x0).abs().max() / x0.abs().max()))
    # a first-order method: small, and halving with twice the steps
    assert errors[0] < 0.05 and errors[1] < 0.6 * errors[0]


def test_adams_bashforth_is_exact_on_polynomials_of_its_order() -> None:
    # eps(k) = k^3 sampled at steps k = 0..-3: AB4 extrapolates a cubic's integral over [0, 1] exactly
    f = [torch.tensor(float(k) ** 3) for k in (-3, -2, -1, 0)]
    assert torch.isclose(adams_bashforth(f[3], f[:3]), torch.tensor(0.25))
    assert torch.isclose(adams_bashforth(f[3], []), f[3])


def test_the_denoiser_feeds_each_process_its_time_and_scale() -> None:
    seen = {}

    def fn(net_in: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        seen["in"], seen["t"] = net_in, time
        return torch.zeros_like(net_in)

    x = noise_like()
    Denoiser(fn, VP)(x, VP.sigmas[[981, 1]])
    assert seen["t"].dtype == torch.long and seen["t"].tolist() == [981, 1]
    torch.testing.assert_close(seen["in"], VP.from_ve(x, VP.sigmas[[981, 1]]))
    Denoiser(fn, VP)(x, torch.tensor([3.0, 0.5]))
    assert seen["t"].dtype == torch.float32 and torch.allclose(seen["t"], VP.sigma_to_t(torch.tensor([3.0, 0.5])).float())
    Denoiser(fn, FLOW, "flow")(x, math.inf)
    assert torch.equal(seen["in"], x) and seen["t"].tolist() == [1000, 1000]  # pure noise, held as x_T
    out = Denoiser(fn, EDM, "edm")(x, 2.0)
    torch.testing.assert_close(seen["in"], x / math.sqrt(4.25))
    torch.testing.assert_close(seen["t"], torch.full((2,), math.log(2) / 4))
    torch.testing.assert_close(out, x * 0.25 / 4.25)  # c_skip x when the network outputs 0
    with pytest.raises(ValueError, match="eps-prediction model cannot denoise pure noise"):
        Denoiser(fn, VP_ZSNR, "eps")(x, math.inf)


def test_clear_errors() -> None:
    den, x = nonlinear(), noise_like()
    with pytest.raises(ValueError, match="strictly decreasing"):
        ddim(den, [1.0, 2.0, 0.0], x)
    with pytest.raises(ValueError, match="at least two levels"):
        ddim(den, [1.0], x)
    with pytest.raises(ValueError, match="only the first level may be inf"):
        ddim(den, [5.0, math.inf, 0.0], x)
    with pytest.raises(ValueError, match="needs `x0`"):
        SAMPLERS["plms"].fn(den, [5.0, 1.0, 0.0], x, mask=torch.ones(SHAPE))
    with pytest.raises(ValueError, match="too large"):
        ddim(den, [14.0, 1.0], x, eta=5.0)
    with pytest.raises(ValueError, match="increasing"):
        ddim_inversion(den, [2.0, 1.0], x, schedule=VP)


class ConditionalModel:
    """The exact network for data N(MU, I) with a small conditional gain, seen through the Sampler adapter (apply_model,
    schedule, parameterization): at low noise it reproduces what it is given, as a trained model would."""

    def __init__(self, schedule, parameterization: str):
        self.schedule, self.parameterization = schedule, parameterization
        self.num_timesteps, self.device = schedule.num_timesteps, torch.device("cpu")
        self.network = gaussian_model(schedule, parameterization, std=1.0).model_fn

    def apply_model(self, x, t, cond):
        return self.network(x, t) * (1 + 0.02 * cond.reshape(-1, 1, 1, 1))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("process,parameterization", [("vp", "x0"), ("vp", "v"), ("flow", "flow")])
def test_x0_v_and_flow_models_with_guidance_and_a_mask(name: str, process: str, parameterization: str) -> None:
    from ldm.models.diffusion.sampler import Sampler

    model = ConditionalModel(VP if process == "vp" else FLOW, parameterization)
    known = noise_like(seed=4).clamp(-1, 1)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    kw = dict(conditioning=torch.tensor([1.0, -1.0]), unconditional_conditioning=torch.zeros(2),
              unconditional_guidance_scale=3.0, verbose=False, seeds=[1, 2])
    seen: list[int] = []
    out, _ = Sampler(model, name).sample(10, 2, SHAPE[1:], mask=mask, x0=known, callback=seen.append, **kw)
    free, _ = Sampler(model, name).sample(10, 2, SHAPE[1:], **kw)
    assert bool(torch.isfinite(out).all()) and seen == list(range(10))
    assert (out - known)[..., :4].abs().max() < 0.25 and (free - known)[..., :4].abs().max() > 1.0
