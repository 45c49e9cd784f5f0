"""DDIMSampler, PLMSSampler and DPMSolverSampler: the original API over a small fake model."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.sampling import NoiseSchedule
from ldm.sampling.parameterization import training_target

B, SHAPE = 2, (4, 8, 8)
MU = torch.linspace(-0.9, 0.9, math.prod(SHAPE)).reshape(SHAPE)
SAMPLERS = [DDIMSampler, PLMSSampler, DPMSolverSampler]


def cond_bias(cond) -> torch.Tensor | float:
    """A per-sample (or per-pixel) offset derived from any conditioning layout."""
    if cond is None:
        return 0.0
    if isinstance(cond, dict):
        return sum(cond_bias(v) for v in cond.values())
    if isinstance(cond, (list, tuple)):
        return sum(cond_bias(c) for c in cond)
    if cond.ndim == 4:  # c_concat: [B, C, H, W]
        return cond.mean(1, keepdim=True)
    return cond.flatten(1).mean(1).reshape(-1, 1, 1, 1)


class FakeModel:
    """Exactly the interface the sampler classes may use, over a deterministic nonlinear network."""

    def __init__(self, parameterization: str = "eps"):
        self.schedule = NoiseSchedule.from_config("linear", 1000, linear_start=0.00085, linear_end=0.012)
        self.parameterization = parameterization
        self.num_timesteps = 1000
        self.device = torch.device("cpu")
        for name, value in self.schedule.buffers().items():
            setattr(self, name, value)
        self.first_stage_model = SimpleNamespace(quantize=lambda z: (torch.round(z * 4) / 4, None, None))
        self.timesteps_seen: list[int] = []

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        self.timesteps_seen.append(int(t[0]))
        tt = t.float().reshape(-1, 1, 1, 1) / self.num_timesteps
        return torch.tanh(0.8 * x_noisy + torch.sin(6 * tt)) * (0.6 + tt) + 0.3 * cond_bias(cond)


class GaussianDataModel(FakeModel):
    """The exact model for data N(MU, std^2 I) (std=0: a point mass), ignoring the conditioning."""

    def __init__(self, parameterization: str = "eps", std: float = 0.0):
        super().__init__(parameterization)
        self.std = std

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        self.timesteps_seen.append(int(t[0]))
        a = self.schedule.alpha_bar(t, x_noisy.ndim)
        x0 = MU + a.sqrt() * self.std**2 / (a * self.std**2 + 1 - a) * (x_noisy - a.sqrt() * MU)
        return training_target(self.parameterization, x0, (x_noisy - a.sqrt() * x0) / (1 - a).sqrt(), a.sqrt(),
                               (1 - a).sqrt())


class ManuallyGuided(FakeModel):
    """A model whose single output is already uncond + scale * (cond - uncond) of FakeModel."""

    def __init__(self, parameterization: str, uncond, scale: float):
        super().__init__(parameterization)
        self.uncond, self.scale = uncond, scale

    def apply_model(self, x_noisy, t, cond):
        u = super().apply_model(x_noisy, t, self.uncond)
        return u + self.scale * (super().apply_model(x_noisy, t, cond) - u)


def x_T(batch: int = B, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed))


def conditionings(kind: str, batch: int = B, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    context, concat = torch.randn(batch, 3, 16, generator=gen), torch.randn(batch, 1, 8, 8, generator=gen)
    if kind == "none":
        return None, None
    if kind == "tensor":
        return context, torch.zeros_like(context)
    return {"c_concat": [concat], "c_crossattn": [context]}, {"c_concat": [concat], "c_crossattn": [context * 0]}


def sample(cls, model, steps: int = 10, **kwargs):
    kwargs.setdefault("batch_size", B)
    kwargs.setdefault("x_T", x_T(kwargs["batch_size"]))
    return cls(model).sample(S=steps, shape=SHAPE, verbose=False, **kwargs)


@pytest.mark.parametrize("cls", SAMPLERS)
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("guidance", ["none", "tensor", "dict"])
def test_every_sampler_runs_for_every_parameterization_and_conditioning(cls, parameterization, guidance) -> None:
    cond, uncond = conditionings(guidance)
    out, inter = sample(cls, FakeModel(parameterization), conditioning=cond, unconditional_conditioning=uncond,
                        unconditional_guidance_scale=1.0 if guidance == "none" else 4.0)
    assert out.shape == (B, *SHAPE) and torch.isfinite(out).all()
    if cls is DPMSolverSampler:
        assert inter is None
    else:
        assert set(inter) == {"x_inter", "pred_x0"} and torch.equal(inter["x_inter"][-1], out)
    if guidance != "none":  # guidance did something
        plain, _ = sample(cls, FakeModel(parameterization), conditioning=cond)
        assert not torch.allclose(plain, out)


@pytest.mark.parametrize("cls", SAMPLERS)
def test_guidance_scale_one_is_no_guidance(cls) -> None:
    cond, uncond = conditionings("dict")
    model = FakeModel()
    guided, _ = sample(cls, model, conditioning=cond, unconditional_conditioning=uncond,
                       unconditional_guidance_scale=1.0)
    plain, _ = sample(cls, FakeModel(), conditioning=cond)
    assert torch.equal(guided, plain)


@pytest.mark.parametrize("cls", SAMPLERS)
@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_guidance_is_uncond_plus_scale_times_difference(cls, parameterization) -> None:
    cond, uncond = conditionings("tensor")
    guided, _ = sample(cls, FakeModel(parameterization), conditioning=cond, unconditional_conditioning=uncond,
                       unconditional_guidance_scale=3.0)
    manual, _ = sample(cls, ManuallyGuided(parameterization, uncond, 3.0), conditioning=cond)
    torch.testing.assert_close(guided, manual, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", SAMPLERS)
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_exact_model_of_a_point_mass_lands_on_it(cls, parameterization) -> None:
    out, _ = sample(cls, GaussianDataModel(parameterization))
    if cls is DPMSolverSampler:  # ends on a clean sample
        expected = MU.expand_as(out)
    else:  # DDIM / PLMS stop at alpha_bar_0 on the straight line x_t = sqrt(a) MU + sqrt(1 - a) eps through x_T
        a = FakeModel().schedule.alphas_cumprod
        first = float(a[901])  # the first of 10 DDIM steps
        eps = (x_T() - math.sqrt(first) * MU) / math.sqrt(1 - first)
        expected = math.sqrt(a[0]) * MU + math.sqrt(1 - a[0]) * eps
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=0)


@pytest.mark.parametrize("cls", SAMPLERS)
def test_inpainting_keeps_the_known_region(cls) -> None:
    known = x_T(seed=4).clamp(-1, 1)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    model = FakeModel()
    out, _ = sample(cls, model, steps=25, mask=mask, x0=known, seeds=[1, 2])
    free, _ = sample(cls, FakeModel(), steps=25, seeds=[1, 2])
    # pasted in at the last evaluated timestep: what is left is of the order of that step's noise level
    level = math.sqrt(1 - float(model.schedule.alphas_cumprod[model.timesteps_seen[-1]]))
    left, right = (out - known)[..., :4].abs().max(), (out - known)[..., 4:].abs().max()
    assert left < 4 * level and right > 1.0
    assert (free - known)[..., :4].abs().max() > 1.0
    nothing, _ = sample(cls, FakeModel(), steps=25, mask=torch.zeros(1, 1, 8, 8), x0=known, seeds=[1, 2])
    torch.testing.assert_close(nothing, free, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls,eta", [(DDIMSampler, 1.0), (DDIMSampler, 0.0), (PLMSSampler, 0.0), (DPMSolverSampler, 0.0)])
def test_seeded_samples_do_not_depend_on_the_batch(cls, eta) -> None:
    seeds = [7, 8, 9, 10, 11, 12, 13, 14]
    cond, uncond = conditionings("tensor", batch=8)
    batch, _ = sample(cls, FakeModel(), x_T=None, batch_size=8, seeds=seeds, eta=eta, conditioning=cond,
                      unconditional_conditioning=uncond, unconditional_guidance_scale=2.0)
    for i in (0, 6):
        alone, _ = sample(cls, FakeModel(), x_T=None, batch_size=1, seeds=[seeds[i]], eta=eta,
                          conditioning=cond[i:i + 1], unconditional_conditioning=uncond[i:i + 1],
                          unconditional_guidance_scale=2.0)
        torch.testing.assert_close(alone[0], batch[i], atol=1e-6, rtol=0)
    assert not torch.allclose(batch[0], batch[1])


def test_ddim_eta_one_draws_noise_and_eta_zero_does_not() -> None:
    runs = [sample(DDIMSampler, FakeModel(), eta=eta, seeds=seeds)[0] for eta, seeds in
            [(0.0, [1, 2]), (0.0, [3, 4]), (1.0, [1, 2]), (1.0, [3, 4])]]
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[2], runs[3])


@pytest.mark.parametrize("cls", [DDIMSampler, PLMSSampler])
def test_callbacks_and_intermediates_follow_the_original(cls) -> None:
    steps, preds = [], []
    out, inter = sample(cls, FakeModel(), steps=20, log_every_t=5, callback=steps.append,
                        img_callback=lambda x0, i: preds.append((i, x0.shape)))
    assert steps == list(range(20)) and [p[0] for p in preds] == steps
    # x_T, then after the steps with index = 19 - i in {19, 15, 10, 5, 0}
    assert len(inter["x_inter"]) == len(inter["pred_x0"]) == 6
    assert torch.equal(inter["x_inter"][0], x_T()) and torch.equal(inter["x_inter"][-1], out)


def test_single_steps_match_the_sampling_loop() -> None:
    model, x = FakeModel("v"), x_T()
    cond, uncond = conditionings("dict")
    kwargs = dict(unconditional_conditioning=uncond, unconditional_guidance_scale=2.0)
    ddim_s = DDIMSampler(model)
    _, inter = ddim_s.sample(S=10, batch_size=B, shape=SHAPE, conditioning=cond, x_T=x, verbose=False,
                             log_every_t=1, **kwargs)
    t = torch.full((B,), int(ddim_s.ddim_timesteps[-1]))
    x_prev, pred_x0 = ddim_s.p_sample_ddim(x, cond, t, index=9, **kwargs)
    torch.testing.assert_close(x_prev, inter["x_inter"][1])
    torch.testing.assert_close(pred_x0, inter["pred_x0"][1])
    plms_s = PLMSSampler(model)
    _, inter = plms_s.sample(S=10, batch_size=B, shape=SHAPE, conditioning=cond, x_T=x, verbose=False,
                             log_every_t=1, **kwargs)
    t_next = torch.full((B,), int(plms_s.ddim_timesteps[-2]))
    x_prev, _, e_t = plms_s.p_sample_plms(x, cond, t, index=9, old_eps=[], t_next=t_next, **kwargs)
    torch.testing.assert_close(x_prev, inter["x_inter"][1])
    assert e_t.shape == x.shape


def test_x0_edits_apply_to_the_predicted_x0() -> None:
    quantized, thresholded = [], []
    sample(DDIMSampler, FakeModel("x0"), quantize_x0=True, img_callback=lambda x0, i: quantized.append(x0))
    sample(PLMSSampler, FakeModel("x0"), dynamic_threshold=0.3, img_callback=lambda x0, i: thresholded.append(x0))
    assert all(torch.equal(q, torch.round(q * 4) / 4) for q in quantized)
    assert all(float(x.pow(2).flatten(1).mean(1).sqrt().max()) <= 0.3 + 1e-5 for x in thresholded)


def test_ucg_schedule_gives_one_scale_per_step() -> None:
    cond, uncond = conditionings("tensor")
    fixed, _ = sample(DDIMSampler, FakeModel(), conditioning=cond, unconditional_conditioning=uncond,
                      unconditional_guidance_scale=3.0)
    scheduled, _ = sample(DDIMSampler, FakeModel(), conditioning=cond, unconditional_conditioning=uncond,
                          ucg_schedule=[3.0] * 10)
    torch.testing.assert_close(scheduled, fixed)
    with pytest.raises(ValueError, match="ucg_schedule has 3 scales for 10"):
        sample(DDIMSampler, FakeModel(), conditioning=cond, unconditional_conditioning=uncond, ucg_schedule=[3.0] * 3)


def test_stochastic_encode_and_decode() -> None:
    sampler = DDIMSampler(GaussianDataModel())
    sampler.make_schedule(ddim_num_steps=20, ddim_eta=0.0, verbose=False)
    x = x_T()
    assert torch.equal(sampler.decode(x, None, t_start=0), x)
    idx = torch.zeros(B, dtype=torch.long)
    torch.testing.assert_close(sampler.stochastic_encode(x, idx, noise=torch.zeros_like(x)),
                               sampler.ddim_alphas[0].sqrt() * x)
    t = torch.full((B,), 300)
    noise = x_T(seed=2)
    torch.testing.assert_close(sampler.stochastic_encode(x, t, use_original_steps=True, noise=noise),
                               sampler.model.schedule.q_sample(x, t, noise))
    # img2img with the exact point-mass model: noise MU to step 10 of 20, denoise it back
    z = sampler.stochastic_encode(MU.expand(B, *SHAPE), torch.full((B,), 10), noise=noise)
    assert (z - MU).abs().max() > 1.0
    assert (sampler.decode(z, None, t_start=10) - MU).abs().max() < 0.15


def test_ddim_inversion_then_decode_returns_the_input() -> None:
    model = GaussianDataModel("eps", std=0.5)
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=50, verbose=False)
    x0 = MU + 0.5 * x_T(seed=3)
    model.timesteps_seen.clear()
    latent, info = sampler.encode(x0, None, t_enc=50, return_intermediates=5)
    assert model.timesteps_seen == sampler.ddim_timesteps.tolist()
    assert torch.equal(info["x_encoded"], latent) and len(info["intermediates"]) == len(info["intermediate_steps"])
    assert latent.std() > 0.9
    back = sampler.decode(latent, None, t_start=50)
    assert (back - x0).abs().max() / x0.abs().max() < 0.05
    same, info = sampler.encode(x0, None, t_enc=0)
    assert torch.equal(same, x0) and info["intermediate_steps"] == []


def test_tiny_unet_with_cross_attention() -> None:
    torch.manual_seed(0)
    unet = UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                     num_res_blocks=1, channel_mult=[1, 2], num_heads=4, use_spatial_transformer=True,
                     context_dim=16).eval()
    model = FakeModel("v")
    model.apply_model = lambda x, t, c: unet(x, t, context=torch.cat(c["c_crossattn"], 1))
    cond, uncond = conditionings("dict")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: extra threads only fight over shared cores
    try:
        for cls in SAMPLERS:
            out, _ = sample(cls, model, steps=4, conditioning=cond, unconditional_conditioning=uncond,
                            unconditional_guidance_scale=5.0)
            assert out.shape == (B, *SHAPE) and torch.isfinite(out).all()
    finally:
        torch.set_num_threads(threads)


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="eta must be 0 for PLMS"):
        sample(PLMSSampler, FakeModel(), eta=0.5)
    with pytest.raises(ValueError, match="one seed per sample"):
        sample(DDIMSampler, FakeModel(), seeds=[1, 2, 3])
    with pytest.warns(UserWarning, match="Got 1 conditionings but batch_size is 2"):
        sample(DDIMSampler, FakeModel(), conditioning={"c_crossattn": [torch.zeros(1, 3, 16)]}, steps=2)
    with pytest.raises(ValueError, match="ddim_num_steps must lie in"):
        sample(DDIMSampler, FakeModel(), steps=600)
    with pytest.raises(ValueError, match="needs `x0`"):
        sample(DPMSolverSampler, FakeModel(), mask=torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="eps-parameterized"):
        sample(DDIMSampler, FakeModel("v"), score_corrector=object())


def test_original_steps_and_the_timesteps_subset() -> None:
    sampler = DDIMSampler(GaussianDataModel("v"))
    sampler.make_schedule(ddim_num_steps=10, verbose=False)
    seen: list[int] = []
    out, _ = sampler.ddim_sampling(None, (B, *SHAPE), x_T=x_T(), ddim_use_original_steps=True, timesteps=40,
                                   callback=seen.append, verbose=False)
    assert len(seen) == 40 and sampler.model.timesteps_seen[-1] == 0
    torch.testing.assert_close(out, MU.expand_as(out), atol=2e-4, rtol=0)  # the last step goes to alpha_bar = 1
    seen.clear()
    sampler.ddim_sampling(None, (B, *SHAPE), x_T=x_T(), timesteps=5, callback=seen.append, verbose=False)
    assert len(seen) == 4  # the original keeps one step fewer than the fraction asked for
