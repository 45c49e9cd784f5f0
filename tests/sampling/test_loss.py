"""The loss parts against their references: min-SNR-gamma (Hang et al. 2023, and diffusers' formula),
the SD3 timestep densities (Esser et al. 2024, eqs. 19-20, with the flow shift of eq. 23), EDM's log-normal
sigma, weighting and training loss (Karras et al. 2022; k-diffusion's Denoiser.loss), offset noise (Guttenberg 2023)."""
import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from ldm.models.diffusion.ddpm import DDPM
from ldm.sampling.loss import (
    DiffusionLoss, EDMLogNormalSigmas, EDMWeighting, LogitNormalTimesteps, MinSNRWeighting, ModeTimesteps,
    UniformTimesteps, UnitWeighting, build_diffusion_loss, offset_noise,
)
from ldm.sampling.schedule import EDMSchedule, FlowSchedule, NoiseSchedule
from ldm.util import ConfigError

SCHEDULE = NoiseSchedule.from_config("linear", 1000, 0.00085, 0.012)
QUANTILES = torch.tensor([0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99])


class FakeModel(torch.nn.Module):
    """The Trainee protocol over a schedule, with a network that returns fixed outputs."""

    def __init__(self, parameterization, output, schedule=SCHEDULE):
        super().__init__()
        self.schedule, self.parameterization, self.output = schedule, parameterization, output
        self.logvar = torch.zeros(schedule.num_timesteps)
        self.lvlb_weights = torch.ones(schedule.num_timesteps)

    def q_sample(self, x_start, t, noise=None):
        return self.schedule.q_sample(x_start, t, noise)

    def apply_model(self, x_noisy, t, cond=None):
        return self.output


def diffusers_min_snr_weights(ref, parameterization, t, gamma):
    """The weights as diffusers' train_text_to_image.py states them: min(snr, gamma) / snr (eps), / (snr + 1) (v)."""
    snr = compute_snr(ref, t)
    weights = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    if parameterization == "eps":
        return weights / snr
    if parameterization == "v":
        return weights / (snr + 1)
    return weights  # x0: the paper's weight itself


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_min_snr_weights_equal_diffusers_formula(parameterization):
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    schedule = NoiseSchedule(ref.betas)
    ref.alphas_cumprod = schedule.alphas_cumprod  # diffusers' own is a float32 cumprod, ~1e-5 off at t=0
    t = torch.arange(1000)
    loss = DiffusionLoss(loss_weighting_config=MinSNRWeighting(gamma=5.0))
    ours = loss.sample_weights(schedule, parameterization, t)
    torch.testing.assert_close(ours, diffusers_min_snr_weights(ref, parameterization, t, 5.0), rtol=1e-6, atol=0)
    assert not torch.allclose(ours, torch.ones_like(ours))  # the weighting is not the unit one


def x0_from_output(parameterization, out, x_t, alpha, sigma, sigma_data=0.5):
    """x0_hat from a network output, written out per parameterization (the papers' definitions)."""
    if parameterization == "eps":
        return (x_t - sigma * out) / alpha
    if parameterization == "x0":
        return out
    if parameterization == "v":  # VP: alpha^2 + sigma^2 = 1 (Salimans & Ho 2022)
        return alpha * x_t - sigma * out
    if parameterization == "flow":  # x_t = (1 - t) x0 + t eps, u = eps - x0
        return x_t - sigma * out
    s = sigma  # edm, alpha = 1 (Karras et al. 2022, Table 1)
    return sigma_data**2 / (s**2 + sigma_data**2) * x_t + s * sigma_data / (s**2 + sigma_data**2) ** 0.5 * out


@pytest.mark.parametrize("parameterization,schedule", [
    ("eps", SCHEDULE), ("x0", SCHEDULE), ("v", SCHEDULE), ("flow", FlowSchedule(shift=3.0)), ("edm", EDMSchedule()),
])
def test_min_snr_loss_is_the_papers_weighted_x0_loss(parameterization, schedule):
    """Hang et al. 2023, eq. 8: L = min(SNR_t, gamma) * ||x0_hat - x0||^2, whatever the model predicts."""
    torch.manual_seed(0)
    t = torch.tensor([0, 3, 40, 250, 600, 998])
    if not isinstance(schedule, NoiseSchedule):
        t = t.float() + 0.25  # fractional grid indices of a continuous process
    x0, noise, out = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    loss, logs = DiffusionLoss(loss_weighting_config=MinSNRWeighting(gamma=5.0))(
        FakeModel(parameterization, out, schedule), x0, t, noise=noise)
    alpha, sigma = (c.reshape(-1, 1, 1, 1) for c in schedule.alpha_sigma(schedule.t_to_sigma(t)))
    x_t = alpha * x0.double() + sigma * noise.double()
    x0_hat = x0_from_output(parameterization, out.double(), x_t, alpha, sigma)
    snr = (alpha / sigma).flatten() ** 2
    expected = (torch.minimum(snr, torch.tensor(5.0)) * (x0_hat - x0.double()).pow(2).mean(dim=(1, 2, 3))).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["train/loss_simple"].item() == pytest.approx(expected.item(), rel=1e-5)
    if parameterization in ("eps", "x0", "v"):  # the VLB term keeps the unweighted per-sample loss
        target = {"eps": noise, "x0": x0, "v": (alpha * noise - sigma * x0).float()}[parameterization]
        assert logs["train/loss_vlb"].item() == pytest.approx((out - target).pow(2).mean().item(), rel=1e-5)


def test_edm_weighting_is_karras_lambda():
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 80.0], dtype=torch.float64)
    lam = EDMWeighting(sigma_data=0.5).x0_weight(sigma)
    torch.testing.assert_close(lam, (sigma**2 + 0.25) / (sigma * 0.5) ** 2)
    # on the eps target (x0 error = sigma * eps error) the weight is lambda * sigma^2
    torch.testing.assert_close(EDMWeighting(0.5)(sigma, sigma), (sigma**2 + 0.25) / 0.25)


def test_unit_weighting_leaves_the_loss_alone():
    assert UnitWeighting()(torch.ones(3), torch.ones(3)) is None
    assert DiffusionLoss().sample_weights(SCHEDULE, "v", torch.tensor([1, 2])) is None


def logit_normal_quantile(q, m, s):
    """Quantiles of SD3's logit-normal: sigmoid(m + s * Phi^-1(q))."""
    return torch.sigmoid(m + s * torch.distributions.Normal(0.0, 1.0).icdf(q))


@pytest.mark.parametrize("m,s", [(0.0, 1.0), (0.5, 0.6)])
def test_logit_normal_matches_sd3_density(m, s):
    sampler = LogitNormalTimesteps(mean=m, std=s)
    u = sampler.unit(200_000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(u.quantile(QUANTILES), logit_normal_quantile(QUANTILES, m, s), atol=4e-3, rtol=0)
    logit = torch.log(u / (1 - u))
    assert logit.mean().item() == pytest.approx(m, abs=0.01)
    assert logit.std().item() == pytest.approx(s, abs=0.01)
    # eq. 19: pi_ln(t) = 1 / (s sqrt(2 pi)) / (t (1 - t)) exp(-(logit(t) - m)^2 / (2 s^2)) on a histogram
    edges = torch.linspace(0.05, 0.95, 19)
    centres = (edges[1:] + edges[:-1]) / 2
    hist = torch.histc(u, bins=18, min=0.05, max=0.95) / (len(u) * (edges[1] - edges[0]))
    lc = torch.log(centres / (1 - centres))
    density = torch.exp(-((lc - m) ** 2) / (2 * s**2)) / (s * math.sqrt(2 * math.pi) * centres * (1 - centres))
    torch.testing.assert_close(hist, density, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("scale", [1.29, -0.5, 0.0])
def test_mode_sampler_matches_sd3_eq20(scale):
    u = ModeTimesteps(scale).unit(200_000, generator=torch.Generator().manual_seed(1))
    assert u.min() >= 0 and u.max() <= 1
    # t = f(u) with f decreasing, so the q-quantile of t is f(1 - q), f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u)
    v = 1 - QUANTILES
    expected = 1 - v - scale * (torch.cos(math.pi / 2 * v) ** 2 - 1 + v)
    torch.testing.assert_close(u.quantile(QUANTILES), expected, atol=4e-3, rtol=0)


def test_mode_scale_outside_the_bijective_range_is_refused():
    with pytest.raises(ValueError, match="scale must lie in"):
        ModeTimesteps(1.8)
    with pytest.raises(ValueError, match="std must be > 0"):
        LogitNormalTimesteps(std=0.0)


@pytest.mark.parametrize("sampler", [UniformTimesteps(), LogitNormalTimesteps(), ModeTimesteps()])
def test_samplers_are_seeded_and_give_valid_timesteps(sampler):
    a = sampler(4096, SCHEDULE, generator=torch.Generator().manual_seed(3))
    b = sampler(4096, SCHEDULE, generator=torch.Generator().manual_seed(3))
    c = sampler(4096, SCHEDULE, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.long and a.min() >= 0 and a.max() <= 999
    assert len(a.unique()) > 500  # spread over the schedule
    if not isinstance(sampler, UniformTimesteps):  # the discrete index is floor(u * T)
        u = sampler.unit(4096, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, (u * 1000).long().clamp(max=999))


def test_uniform_sampler_draws_as_the_original():
    torch.manual_seed(7)
    ref = torch.randint(0, 1000, (16,)).long()
    torch.manual_seed(7)
    assert torch.equal(UniformTimesteps()(16, SCHEDULE), ref)


def test_offset_noise_has_the_per_channel_mean_variance():
    torch.manual_seed(0)
    x = torch.empty(4000, 4, 8, 8)
    noise = offset_noise(x, 0.1)
    means = noise.mean(dim=(2, 3))  # [B, C]: the offset is per sample and channel
    assert means.var().item() == pytest.approx(1 / 64 + 0.1**2, rel=0.05)
    assert noise.var().item() == pytest.approx(1 + 0.1**2, rel=0.02)
    corr = torch.corrcoef(means.T)  # channels get independent offsets
    assert corr.fill_diagonal_(0).abs().max() < 0.05
    torch.manual_seed(0)
    plain = offset_noise(x, 0.0)
    torch.manual_seed(0)
    assert torch.equal(plain, torch.randn_like(x))  # strength 0: the original draw, nothing else
    assert plain.mean(dim=(2, 3)).var().item() == pytest.approx(1 / 64, rel=0.05)


def test_the_loss_trains_on_offset_noise():
    out = torch.zeros(2, 4, 8, 8)
    model = FakeModel("eps", out)
    x0, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 500])
    torch.manual_seed(0)
    loss, _ = DiffusionLoss(offset_noise_strength=0.3)(model, x0, t)
    torch.manual_seed(0)
    expected = offset_noise(x0, 0.3).pow(2).mean()  # eps target, zero output
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_configs_build_the_parts_and_name_mistakes():
    loss = build_diffusion_loss(
        {"target": "ldm.sampling.loss.DiffusionLoss",
         "params": {"sigma_sampler_config": {"target": "ldm.sampling.loss.ModeTimesteps", "params": {"scale": 0.5}},
                    "loss_weighting_config": {"target": "ldm.sampling.loss.MinSNRWeighting"},
                    "offset_noise_strength": 0.05}},
        loss_type="l1", l_simple_weight=2.0, original_elbo_weight=0.0, learn_logvar=False)
    assert isinstance(loss.sampler, ModeTimesteps) and loss.sampler.scale == 0.5
    assert isinstance(loss.weighting, MinSNRWeighting) and loss.weighting.gamma == 5.0
    assert (loss.loss_type, loss.l_simple_weight, loss.offset_noise_strength) == ("l1", 2.0, 0.05)
    with pytest.raises(ConfigError, match="loss_config.params.loss_type: set model.params.loss_type"):
        build_diffusion_loss({"target": "ldm.sampling.loss.DiffusionLoss", "params": {"loss_type": "l1"}},
                             loss_type="l2", l_simple_weight=1.0, original_elbo_weight=0.0, learn_logvar=False)
    with pytest.raises(ConfigError, match="sigma_sampler_config: expected a TimestepSampler, got MinSNRWeighting"):
        DiffusionLoss(sigma_sampler_config={"target": "ldm.sampling.loss.MinSNRWeighting"})
    with pytest.raises(ValueError, match="loss_type 'l3' unknown"):
        DiffusionLoss(loss_type="l3")


def test_edm_sigma_sampler_is_log_normal_and_maps_onto_every_schedule():
    sampler = EDMLogNormalSigmas()
    sigma = sampler.sigmas(200_000, generator=torch.Generator().manual_seed(0))
    log = sigma.log()
    assert log.mean().item() == pytest.approx(-1.2, abs=0.01) and log.std().item() == pytest.approx(1.2, abs=0.01)
    normal = torch.distributions.Normal(0.0, 1.0).icdf(QUANTILES)
    torch.testing.assert_close(log.quantile(QUANTILES), -1.2 + 1.2 * normal, atol=0.02, rtol=0)
    edm = EDMSchedule()
    t = sampler(4096, edm, generator=torch.Generator().manual_seed(1))  # fractional indices of the EDM grid
    expected = sampler.sigmas(4096, generator=torch.Generator().manual_seed(1)).double()
    assert t.is_floating_point()
    torch.testing.assert_close(edm.t_to_sigma(t.double()), expected, rtol=2e-5, atol=0)
    t_vp = sampler(4096, SCHEDULE, generator=torch.Generator().manual_seed(1))  # the nearest discrete timestep
    assert t_vp.dtype == torch.long and 0 <= t_vp.min() and t_vp.max() <= 999
    nearest = (SCHEDULE.log_sigmas[None] - expected.clamp(max=SCHEDULE.sigma_max).log()[:, None]).abs().argmin(1)
    assert torch.equal(t_vp, nearest)


def test_logit_normal_on_a_flow_schedule_is_shifted_as_sd3():
    schedule = FlowSchedule(shift=3.0)
    sampler = LogitNormalTimesteps()
    t = sampler(200_000, schedule, generator=torch.Generator().manual_seed(2))
    flow_time = schedule.alpha_sigma(schedule.t_to_sigma(t.double()))[1]  # x_t = (1 - t') x0 + t' eps
    u = sampler.unit(200_000, generator=torch.Generator().manual_seed(2)).double()  # the same draws on (0, 1)
    torch.testing.assert_close(flow_time, 3.0 * u / (1 + 2.0 * u), rtol=1e-6, atol=1e-6)  # SD3 eq. 23, shift 3
    assert flow_time.median().item() == pytest.approx(0.75, abs=4e-3)  # the shifted median: 3 * 0.5 / 2
    x0, noise = torch.randn(8, 4, 2, 2), torch.randn(8, 4, 2, 2)
    k = t[:8]
    tk = flow_time[:8].float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(schedule.q_sample(x0, k, noise), (1 - tk) * x0 + tk * noise)


def test_edm_loss_equals_k_diffusion_denoiser_loss(kd):
    """EDM training (EDMSchedule, edm parameterization, log-normal sigma, EDM weighting) gives k-diffusion's
    layers.Denoiser.loss on the same inner network, input, sigma and noise."""
    torch.manual_seed(0)
    unet = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[],
                           num_res_blocks=1, channel_mult=[1, 2], num_heads=4)}
    loss_config = {"target": "ldm.sampling.loss.DiffusionLoss",
                   "params": {"sigma_sampler_config": {"target": "ldm.sampling.loss.EDMLogNormalSigmas"},
                              "loss_weighting_config": {"target": "ldm.sampling.loss.EDMWeighting"}}}
    model = DDPM(unet_config=unet, image_size=8, channels=3, monitor=None, use_ema=False, parameterization="edm",
                 process_config={"target": "ldm.sampling.schedule.EDMSchedule", "params": {"sigma_data": 0.5}},
                 loss_config=loss_config)
    with torch.no_grad():  # the UNet's output layer starts at zero: give it something to say
        for p in model.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x0, noise = torch.randn(6, 3, 8, 8) * 0.5, torch.randn(6, 3, 8, 8)
    sigma = model.diffusion_loss.sampler.sigmas(6, generator=torch.Generator().manual_seed(0))
    t = model.diffusion_loss.sampler(6, model.schedule, generator=torch.Generator().manual_seed(0))
    ours, logs = model.p_losses(x0, t, noise=noise)
    # k-diffusion's inner model takes sigma; ours takes c_noise = ln(sigma) / 4 (EDM, Table 1)
    reference = kd.layers.Denoiser(lambda x, s: model.apply_model(x, s.log() / 4), sigma_data=0.5)
    per_sample = reference.loss(x0, noise, sigma)
    torch.testing.assert_close(ours, per_sample.mean(), rtol=1e-5, atol=0)
    assert 0.05 < ours.item() < 50 and "train/loss_simple" in logs
    # the EDM weighting on the network output F is k-diffusion's 'karras' weighting (ones): lambda * c_out^2 = 1
    c_out = sigma.double() * 0.5 / (sigma.double() ** 2 + 0.25) ** 0.5
    torch.testing.assert_close(EDMWeighting()(sigma.double(), c_out), torch.ones(6, dtype=torch.float64))
