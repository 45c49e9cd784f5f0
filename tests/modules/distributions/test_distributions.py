"""DiagonalGaussianDistribution and normal_kl against torch.distributions' closed forms."""
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ldm.modules.distributions.distributions import (
    DiagonalGaussianDistribution,
    DiracDistribution,
    normal_kl,
)


def _params(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(3, 8, 5, 6)  # 4 latent channels: mean then logvar


def _torch_normal(params: torch.Tensor) -> Normal:
    mean, logvar = params.chunk(2, dim=1)
    return Normal(mean, torch.exp(0.5 * logvar))


def test_kl_to_standard_normal():
    params = _params(0)
    expected = kl_divergence(_torch_normal(params), Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    kl = DiagonalGaussianDistribution(params).kl()
    assert kl.shape == (3,)
    assert torch.allclose(kl, expected, rtol=1e-5)


def test_kl_between_two_gaussians():
    p, q = _params(0), _params(1)
    expected = kl_divergence(_torch_normal(p), _torch_normal(q)).sum(dim=(1, 2, 3))
    kl = DiagonalGaussianDistribution(p).kl(DiagonalGaussianDistribution(q))
    assert torch.allclose(kl, expected, rtol=1e-5)


def test_nll_matches_log_prob():
    params = _params(2)
    x = torch.randn(3, 4, 5, 6)
    expected = -_torch_normal(params).log_prob(x).sum(dim=(1, 2, 3))
    dist = DiagonalGaussianDistribution(params)
    assert torch.allclose(dist.nll(x), expected, rtol=1e-5)
    assert torch.allclose(dist.nll(x, dims=[1]), -_torch_normal(params).log_prob(x).sum(dim=1), rtol=1e-5)


def test_mode_sample_and_generator():
    params = _params(3)
    dist = DiagonalGaussianDistribution(params)
    assert torch.equal(dist.mode(), params[:, :4])
    a = dist.sample(generator=torch.Generator().manual_seed(7))
    b = dist.sample(generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    eps = torch.randn(params[:, :4].shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(a, dist.mean + dist.std * eps)
    half = DiagonalGaussianDistribution(params.double())
    assert half.sample().dtype == torch.float64


def test_logvar_is_clamped():
    params = torch.cat([torch.zeros(1, 2, 2, 2), torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)], 1)
    dist = DiagonalGaussianDistribution(params)
    assert dist.logvar[0, 0].eq(-30.0).all() and dist.logvar[0, 1].eq(20.0).all()
    assert torch.allclose(dist.var[0, 1], torch.exp(torch.tensor(20.0)))
    assert torch.allclose(dist.std[0, 0], torch.exp(torch.tensor(-15.0)))


def test_deterministic():
    params = _params(4)
    dist = DiagonalGaussianDistribution(params, deterministic=True)
    assert dist.std.eq(0).all() and dist.var.eq(0).all()
    assert torch.equal(dist.sample(), dist.mean)
    assert dist.kl().eq(0).all() and dist.nll(torch.randn(3, 4, 5, 6)).eq(0).all()


def test_odd_channel_count_is_rejected():
    with pytest.raises(ValueError, match="even"):
        DiagonalGaussianDistribution(torch.zeros(1, 3, 2, 2))


def test_dirac():
    value = torch.randn(2, 3)
    dirac = DiracDistribution(value)
    assert dirac.sample() is value and dirac.mode() is value


def test_normal_kl_elementwise_and_scalars():
    torch.manual_seed(5)
    m1, lv1, m2, lv2 = torch.randn(4, 10)
    expected = kl_divergence(Normal(m1, torch.exp(0.5 * lv1)), Normal(m2, torch.exp(0.5 * lv2)))
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-5)
    to_std = kl_divergence(Normal(m1, torch.exp(0.5 * lv1)), Normal(0.0, 1.0))
    assert torch.allclose(normal_kl(m1, lv1, 0.0, 0.0), to_std, rtol=1e-5)
    with pytest.raises(TypeError, match="at least one tensor"):
        normal_kl(0.0, 0.0, 1.0, 0.0)
