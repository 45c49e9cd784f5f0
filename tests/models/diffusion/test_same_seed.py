"""Same checkpoint, same seed, same images as the original samplers (CompVis/latent-diffusion, SD 1/2).

With torch's global generator (no per-sample seeds) the original DDIM / PLMS / ancestral loops draw their random
numbers in a fixed order: the start code, then per step the inpainting noise of `q_sample(x0, t)` and the step noise
(drawn even where it is multiplied by sigma_t = 0), and `F.dropout`'s mask. The references below are the original
loops' maths, written out in the original's process scale over the same network; each test runs ours and the
reference from one `torch.manual_seed` and compares, for two batches in a row (the second one sees the generator
state the first left behind).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_ldm import model_config, randomise_zero_convs, unet

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.sampling.noise import SeededNoise
from ldm.util import instantiate_from_config

B, SHAPE, STEPS = 2, (4, 8, 8), 10


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = model_config("ldm.models.diffusion.ddpm.LatentDiffusion", unet(4, context_dim=None),
                          "__is_unconditional__", None)
    m = instantiate_from_config(config).eval()
    randomise_zero_convs(m)
    return m


def inpainting_inputs():
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(B, *SHAPE, generator=g)
    mask = torch.zeros(B, 1, *SHAPE[1:])
    mask[..., :, :4] = 1
    return mask, x0


def buffers(model):
    """The original's float32 buffers as float64 numpy arrays."""
    return {k: getattr(model, k).detach().double().cpu() for k in ("alphas_cumprod", "sqrt_alphas_cumprod",
                                                                   "sqrt_one_minus_alphas_cumprod")}


def original_q_sample(buf, x0, t):
    """The original q_sample with its own randn_like draw."""
    noise = torch.randn_like(x0)
    return (buf["sqrt_alphas_cumprod"][t].float() * x0 + buf["sqrt_one_minus_alphas_cumprod"][t].float() * noise)


def original_ddim_schedule(model, eta):
    """make_ddim_timesteps('uniform') + make_ddim_sampling_parameters of the original."""
    T = model.num_timesteps
    steps = np.asarray(list(range(0, T, T // STEPS))) + 1
    ac = buffers(model)["alphas_cumprod"].numpy()
    alphas = ac[steps]
    alphas_prev = np.asarray([ac[0]] + ac[steps[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return steps, alphas, alphas_prev, sigmas


@torch.no_grad()
def original_ddim_or_plms(model, plms=False, eta=0.0, mask=None, x0=None, temperature=1.0, noise_dropout=0.0):
    """The original DDIMSampler.ddim_sampling / PLMSSampler.plms_sampling loop (unconditional)."""
    steps, alphas, alphas_prev, sigmas = original_ddim_schedule(model, eta)
    buf = buffers(model)
    img = torch.randn(B, *SHAPE)
    time_range = np.flip(steps)
    old_eps = []

    def x_prev_and_pred_x0(x, e_t, index):
        a_t, a_prev, sigma_t = alphas[index], alphas_prev[index], sigmas[index]
        pred_x0 = (x - np.sqrt(1 - a_t) * e_t) / np.sqrt(a_t)
        dir_xt = np.sqrt(1.0 - a_prev - sigma_t**2) * e_t
        noise = sigma_t * torch.randn(x.shape) * temperature
        if noise_dropout > 0.0:
            noise = F.dropout(noise, p=noise_dropout)
        return np.sqrt(a_prev) * pred_x0 + dir_xt + noise

    for i, step in enumerate(time_range):
        index = len(steps) - i - 1
        ts = torch.full((B,), int(step), dtype=torch.long)
        if mask is not None:
            img = original_q_sample(buf, x0, ts[0]) * mask + (1.0 - mask) * img
        e_t = model.apply_model(img, ts, None)
        if not plms:
            img = x_prev_and_pred_x0(img, e_t, index)
            continue
        ts_next = torch.full((B,), int(time_range[min(i + 1, len(time_range) - 1)]), dtype=torch.long)
        if not old_eps:
            e_next = model.apply_model(x_prev_and_pred_x0(img, e_t, index), ts_next, None)
            e_prime = (e_t + e_next) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        img = x_prev_and_pred_x0(img, e_prime, index)
        old_eps = (old_eps + [e_t])[-3:]
    return img


@torch.no_grad()
def original_ancestral(model, mask=None, x0=None, temperature=1.0, noise_dropout=0.0):
    """The original LatentDiffusion.p_sample_loop with p_sample / p_mean_variance (eps, clip_denoised False): the
    known region pasted after each step as q_sample(x0, t)."""
    get = lambda name, t: getattr(model, name)[t].reshape(-1, 1, 1, 1)  # noqa: E731
    buf = buffers(model)
    img = torch.randn(B, *SHAPE)
    for i in reversed(range(model.num_timesteps)):
        ts = torch.full((B,), i, dtype=torch.long)
        eps = model.apply_model(img, ts, None)
        x_recon = get("sqrt_recip_alphas_cumprod", ts) * img - get("sqrt_recipm1_alphas_cumprod", ts) * eps
        mean = get("posterior_mean_coef1", ts) * x_recon + get("posterior_mean_coef2", ts) * img
        log_var = get("posterior_log_variance_clipped", ts)
        noise = torch.randn(img.shape) * temperature
        if noise_dropout > 0.0:
            noise = F.dropout(noise, p=noise_dropout)
        nonzero = (1 - (ts == 0).float()).reshape(B, 1, 1, 1)
        img = mean + nonzero * (0.5 * log_var).exp() * noise
        if mask is not None:
            img = original_q_sample(buf, x0, ts[0]) * mask + (1.0 - mask) * img
    return img


def twice(fn, seed=1234):
    """Two batches in a row from one seed."""
    torch.manual_seed(seed)
    return fn(), fn()


def ours_scheduled(model, cls, **kwargs):
    return cls(model).sample(STEPS, B, SHAPE, None, verbose=False, **kwargs)[0]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("cls", [DDIMSampler, PLMSSampler])
def test_ddim_and_plms_follow_the_originals_random_stream(model, cls, masked) -> None:
    mask, x0 = inpainting_inputs() if masked else (None, None)
    ours = twice(lambda: ours_scheduled(model, cls, eta=0.0, mask=mask, x0=x0))
    reference = twice(lambda: original_ddim_or_plms(model, plms=cls is PLMSSampler, mask=mask, x0=x0))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    assert not torch.allclose(ours[0], ours[1])  # the second batch starts from other noise


@pytest.mark.parametrize("eta,temperature,noise_dropout", [(0.0, 1.0, 0.3), (0.7, 0.8, 0.0), (0.7, 0.8, 0.4)])
def test_ddim_noise_dropout_and_temperature_are_the_originals(model, eta, temperature, noise_dropout) -> None:
    mask, x0 = inpainting_inputs()
    kwargs = dict(mask=mask, x0=x0, temperature=temperature, noise_dropout=noise_dropout)
    ours = twice(lambda: ours_scheduled(model, DDIMSampler, eta=eta, **kwargs))
    reference = twice(lambda: original_ddim_or_plms(model, eta=eta, **kwargs))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def test_plms_noise_dropout_consumes_the_originals_stream(model) -> None:
    """PLMS has sigma_t = 0, yet the original's F.dropout of its zero noise draws a mask: the next batch sees it."""
    ours = twice(lambda: ours_scheduled(model, PLMSSampler, eta=0.0, noise_dropout=0.5))
    reference = twice(lambda: original_ddim_or_plms(model, plms=True, noise_dropout=0.5))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


@pytest.mark.parametrize("masked,temperature,noise_dropout", [(True, 1.0, 0.0), (True, 0.9, 0.25), (False, 1.0, 0.0)])
def test_ancestral_sampling_pastes_after_the_step_as_the_original(model, masked, temperature, noise_dropout) -> None:
    mask, x0 = inpainting_inputs() if masked else (None, None)
    kwargs = dict(mask=mask, x0=x0, temperature=temperature, noise_dropout=noise_dropout)
    with torch.no_grad():
        ours = twice(lambda: model.sample(None, batch_size=B, verbose=False, **kwargs))
    reference = twice(lambda: original_ancestral(model, **kwargs))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=0)
    if masked:  # the known region is x0 at alpha_bar_0 of the last paste, not a sample of the model
        a0 = float(model.alphas_cumprod[0])
        assert (ours[0] - a0**0.5 * x0)[..., :4].abs().max() < 6 * (1 - a0) ** 0.5


def test_seeded_path_draws_only_what_a_step_adds(model) -> None:
    """Per-sample seeds keep their stream: eta = 0 DDIM with seeds draws the start code and nothing else, so it equals
    the run from that start code on any other generator state."""
    seeds = [5, 6]
    x_T = SeededNoise(seeds).randn((B, *SHAPE))
    torch.manual_seed(0)
    seeded = ours_scheduled(model, DDIMSampler, eta=0.0, seeds=seeds)
    torch.manual_seed(99)
    given = ours_scheduled(model, DDIMSampler, eta=0.0, x_T=x_T)
    torch.testing.assert_close(seeded, given, atol=0, rtol=0)


def test_seeded_dropout_is_a_bernoulli_mask_per_sample() -> None:
    """SeededNoise.dropout: F.dropout's scaling; sample i's mask depends on its seed only."""
    z = torch.ones(3, 4000)
    dropped = SeededNoise([1, 2, 3]).dropout(z, 0.3)
    assert torch.equal(dropped.unique(), torch.tensor([0.0, 1 / 0.7]))
    assert abs(float((dropped == 0).float().mean()) - 0.3) < 0.02
    alone = SeededNoise([2]).dropout(z[:1], 0.3)
    assert torch.equal(alone[0], dropped[1]) and not torch.equal(dropped[0], dropped[1])
