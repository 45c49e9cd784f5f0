"""Noise schedules, timestep embeddings and friends, checked against diffusers and closed forms."""
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.embeddings import get_timestep_embedding

from ldm.modules.diffusionmodules.util import (
    GroupNorm32,
    extract_into_tensor,
    make_beta_schedule,
    make_ddim_sampling_parameters,
    make_ddim_timesteps,
    mean_flat,
    timestep_embedding,
    zero_module,
)


def test_linear_schedule_is_diffusers_scaled_linear():
    ours = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear").betas.double().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert ours.dtype == np.float64 and ours.shape == (1000,)


def test_squaredcos_cap_v2_matches_diffusers():
    ours = make_beta_schedule("squaredcos_cap_v2", 1000)
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").betas.double().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def test_cosine_schedule_reproduces_alpha_bar():
    s, n = 8e-3, 100
    betas = make_beta_schedule("cosine", n, cosine_s=s)
    alphas_cumprod = np.cumprod(1 - betas)
    f = lambda t: math.cos((t / n + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f(t + 1) / f(0) for t in range(n)])
    np.testing.assert_allclose(alphas_cumprod[:-1], expected[:-1], rtol=1e-6)
    assert betas.max() <= 0.999


def test_sqrt_schedules():
    np.testing.assert_allclose(make_beta_schedule("sqrt_linear", 5, 0.1, 0.5), [0.1, 0.2, 0.3, 0.4, 0.5])
    np.testing.assert_allclose(make_beta_schedule("sqrt", 2, 0.04, 0.09), [0.2, 0.3])


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="schedule 'cosin' unknown; expected one of linear, cosine"):
        make_beta_schedule("cosin", 10)


@pytest.mark.parametrize("dim", [32, 33])
def test_timestep_embedding_is_cos_then_sin_like_diffusers(dim):
    t = torch.tensor([0, 1, 17, 999])
    ours = timestep_embedding(t, dim)
    theirs = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert torch.allclose(ours[0, : dim // 2], torch.ones(dim // 2))  # cos(0) first
    assert timestep_embedding(t, 4, repeat_only=True).tolist()[2] == [17, 17, 17, 17]


def test_ddim_timesteps_uniform_and_quad():
    np.testing.assert_array_equal(make_ddim_timesteps("uniform", 4, 1000), [1, 251, 501, 751])
    quad = make_ddim_timesteps("quad", 5, 1000)
    assert quad[0] == 1 and np.all(np.diff(quad) > 0) and quad[-1] <= 801
    with pytest.raises(ValueError, match="ddim_discr_method 'cubic' unknown"):
        make_ddim_timesteps("cubic", 4, 1000)


def test_ddim_sampling_parameters_eta_zero_is_deterministic():
    alphacums = np.cumprod(1 - make_beta_schedule("linear", 1000))
    steps = make_ddim_timesteps("uniform", 10, 1000)
    sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(alphacums, steps, eta=0.0)
    assert np.all(sigmas == 0)
    np.testing.assert_allclose(alphas, alphacums[steps])
    assert alphas_prev[0] == alphacums[0] and np.allclose(alphas_prev[1:], alphas[:-1])
    sigmas1, _, _ = make_ddim_sampling_parameters(alphacums, steps, eta=1.0)
    expected = np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    np.testing.assert_allclose(sigmas1, expected)


def test_extract_into_tensor_broadcasts():
    a = torch.arange(10.0)
    out = extract_into_tensor(a, torch.tensor([2, 7]), (2, 3, 4, 4))
    assert out.shape == (2, 1, 1, 1) and out.flatten().tolist() == [2.0, 7.0]


def test_groupnorm32_computes_in_fp32():
    torch.manual_seed(0)
    norm = GroupNorm32(4, 8)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 8, 5, 5) * 100 + 1000  # large offset: variance is lost in bf16 arithmetic
    out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    ref = torch.nn.functional.group_norm(x.bfloat16().float(), 4, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)


def test_zero_module_and_mean_flat():
    layer = zero_module(torch.nn.Linear(3, 3))
    assert all(torch.count_nonzero(p) == 0 for p in layer.parameters())
    assert mean_flat(torch.arange(8.0).reshape(2, 4)).tolist() == [1.5, 5.5]
