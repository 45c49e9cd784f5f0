"""The per-call glue of sampling is computed once per level, and the shortcuts give the results of the long way:
the Denoiser's kept levels, guidance's doubled time input, LMS's coefficients by Gauss-Legendre quadrature."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.polynomial import Polynomial

from ldm.sampling import Denoiser, guided_model_fn
from ldm.sampling.samplers.lms import lms_coefficient
from ldm.sampling.schedule import EDMSchedule, NoiseSchedule

VP = NoiseSchedule.from_config("linear", 1000, 0.00085, 0.012)


def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A network whose output depends on x and on the time input."""
    return torch.sin(x) * (1 + t.float().reshape(-1, *((1,) * (x.ndim - 1))) / 1000)


@pytest.mark.parametrize("schedule,parameterization", [(VP, "eps"), (VP, "v"), (EDMSchedule(), "edm")])
def test_kept_levels_give_the_first_calls_result_and_are_computed_once(schedule, parameterization, monkeypatch):
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    sigmas = [torch.full((3,), s, dtype=torch.float64) for s in (14.6, 3.2, 0.4)]
    sigmas.append(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64))  # one level per sample
    reference = [Denoiser(network, schedule, parameterization)(x, s) for s in sigmas]  # a fresh denoiser per level
    calls = []
    original = type(schedule).alpha_sigma
    monkeypatch.setattr(type(schedule), "alpha_sigma", lambda self, s: calls.append(1) or original(self, s))
    denoise = Denoiser(network, schedule, parameterization)
    for _ in range(3):
        for sigma, expected in zip(sigmas, reference):
            assert torch.equal(denoise(x, sigma.clone()), expected)
    assert len(calls) == len(sigmas)  # once per level, not once per call
    expected = Denoiser(network, schedule, parameterization)(x.double(), sigmas[0])
    del calls[:]
    assert torch.equal(denoise(x.double(), sigmas[0]), expected)
    assert len(calls) == 1  # another dtype is another entry
    assert torch.equal(denoise(x, 3.2), reference[1])  # a scalar level equals the batch of it


def test_kept_levels_still_refuse_pure_noise_for_eps_models():
    denoise = Denoiser(network, VP, "eps")
    with pytest.raises(ValueError, match="cannot denoise pure noise"):
        denoise(torch.zeros(2, 4, 2, 2), torch.full((2,), float("inf"), dtype=torch.float64))


def test_guidance_doubles_a_time_input_again_after_it_changed_in_place():
    seen = []

    def model(x, t, c):
        seen.append(t.clone())
        return x * c.reshape(-1, 1)

    fn = guided_model_fn(model, torch.full((2,), 2.0), torch.full((2,), 1.0), 3.0)
    t = torch.tensor([5, 5])
    x = torch.ones(2, 3)
    first = fn(x, t)
    fn(x, t)
    t.fill_(7)  # the same tensor, new values
    fn(x, t)
    assert torch.equal(first, torch.full((2, 3), 1.0 + 3.0 * (2.0 - 1.0)))
    assert [s.tolist() for s in seen] == [[5, 5, 5, 5], [5, 5, 5, 5], [7, 7, 7, 7]]


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_lms_coefficients_are_the_exact_integrals_of_the_lagrange_basis(order):
    rng = np.random.default_rng(order)
    for _ in range(20):
        points = np.sort(rng.uniform(0.02, 14.0, order))[::-1]
        start, end = points[0], points[0] * rng.uniform(0.3, 0.95)
        for j in range(order):
            basis = Polynomial([1.0])
            for k, point in enumerate(points):
                if k != j:
                    basis = basis * Polynomial([-point, 1.0]) / (points[j] - point)
            exact = float(basis.integ()(end) - basis.integ()(start))
            assert lms_coefficient(points, j, start, end) == pytest.approx(exact, rel=1e-9, abs=1e-12)
    # the coefficients integrate the interpolated slope: a constant slope 1 gives the step length
    points = [5.0, 6.0, 8.0, 11.0][:order]
    total = sum(lms_coefficient(points, j, 5.0, 4.0) for j in range(len(points)))
    assert total == pytest.approx(-1.0, rel=1e-12)
