"""Brownian-tree noise: k-diffusion's BrownianTreeNoiseSampler values, batch invariance, consistent increments."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from ldm.sampling.noise import BrownianTreeNoise, GlobalNoise, SeededNoise, brownian_noise

import torchsde  # noqa: F401 - BrownianTreeNoise needs it (test extra)

SIGMAS = torch.tensor([14.6, 6.0, 2.5, 1.0, 0.4, 0.1, 0.03, 0.0])
LEVELS = SIGMAS.tolist()
SHAPE = (3, 4, 8, 8)


def test_between_equals_k_diffusion_brownian_tree_noise_sampler(kd) -> None:
    x = torch.zeros(SHAPE)
    theirs = kd.sampling.BrownianTreeNoiseSampler(x, SIGMAS[SIGMAS > 0].min(), SIGMAS.max(), seed=[5, 6, 7])
    ours = brownian_noise(SeededNoise([5, 6, 7]), LEVELS, 3, "cpu")
    for a, b in zip(SIGMAS[:-2], SIGMAS[1:-1]):
        torch.testing.assert_close(ours.between(float(a), float(b), SHAPE), theirs(a, b), rtol=1e-6, atol=0)


def test_each_sample_depends_on_its_own_seed_only() -> None:
    batch = brownian_noise(SeededNoise([5, 6, 7]), LEVELS, 3, "cpu")
    alone = brownian_noise(SeededNoise([6]), LEVELS, 1, "cpu")
    for a, b in zip(LEVELS[:-2], LEVELS[1:-1]):
        assert torch.equal(batch.between(a, b, SHAPE)[1], alone.between(a, b, (1, *SHAPE[1:]))[0])
    assert torch.equal(batch.randn(SHAPE)[1:2], SeededNoise([6]).randn((1, *SHAPE[1:])))


def test_increments_of_split_steps_add_up() -> None:
    """W(c) - W(a) = (W(b) - W(a)) + (W(c) - W(b)): the noise of one step is that of the same step cut in two."""
    noise = brownian_noise(SeededNoise([1, 2, 3]), LEVELS, 3, "cpu")
    a, b, c = 6.0, 3.0, 1.0
    whole = noise.between(a, c, SHAPE) * math.sqrt(a - c)
    parts = noise.between(a, b, SHAPE) * math.sqrt(a - b) + noise.between(b, c, SHAPE) * math.sqrt(b - c)
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-5)
    assert abs(float(noise.between(a, c, SHAPE).std()) - 1) < 0.1
    assert torch.equal(noise.between(c, a, SHAPE), -noise.between(a, c, SHAPE))


def test_global_noise_gets_one_seed_per_sample() -> None:
    torch.manual_seed(0)
    tree = brownian_noise(GlobalNoise(), LEVELS, 2, "cpu")
    assert len(tree.seeds) == 2 and tree.seeds[0] != tree.seeds[1]
    assert brownian_noise(tree, LEVELS[2:], 2, "cpu") is tree and tree.span == (LEVELS[-2], LEVELS[2])


def test_missing_torchsde_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchsde", None)
    with pytest.raises(ImportError, match="needs the torchsde package: pip install torchsde"):
        BrownianTreeNoise([0])


def test_a_tree_needs_a_finite_span() -> None:
    noise = BrownianTreeNoise([0])
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        noise.bind(1.0, float("inf"))
    with pytest.raises(ValueError, match="no span"):
        noise.between(2.0, 1.0, (1, 2))
