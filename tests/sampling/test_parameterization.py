"""eps / x0 / v / flow / edm conversions (ldm.sampling.parameterization) on every process, against the references."""
from __future__ import annotations

import math

import pytest
import torch

from ldm.sampling.parameterization import (
    PARAMETERIZATIONS,
    check_parameterization,
    edm_scalings,
    input_scale,
    to_prediction,
    to_x0,
    training_target,
)
from ldm.sampling.schedule import EDMSchedule, FlowSchedule, NoiseSchedule

import diffusers  # the test-only reference (setup.py test extra): missing, the suite fails

PROCESSES = {
    "vp": NoiseSchedule.from_config("linear", 1000, linear_start=0.00085, linear_end=0.012),
    "edm": EDMSchedule(),
    "flow": FlowSchedule(shift=3.0),
}


def sample(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 4, 4, generator=gen, dtype=torch.float64), torch.randn(4, 3, 4, 4, generator=gen,
                                                                                     dtype=torch.float64)


@pytest.mark.parametrize("process", list(PROCESSES))
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_the_target_converts_back_to_x0_and_eps(process: str, parameterization: str) -> None:
    schedule = PROCESSES[process]
    x0, eps = sample()
    t = torch.tensor([3, 200, 600, 990])
    alpha, sigma = schedule.coefficients(t, x0)
    x_t = alpha * x0 + sigma * eps
    target = training_target(parameterization, x0, eps, alpha, sigma, schedule.sigma_data)
    pred = to_prediction(parameterization, target, x_t, alpha, sigma, schedule.sigma_data)
    torch.testing.assert_close(pred.x0, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pred.eps, eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(to_x0(parameterization, target, x_t, alpha, sigma, schedule.sigma_data), x0)


def test_v_and_flow_targets_equal_diffusers() -> None:
    x0, eps = sample(1)
    x0, eps = x0.float(), eps.float()
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear")
    t = torch.tensor([0, 250, 500, 999])
    alpha, sigma = PROCESSES["vp"].coefficients(t, x0)
    torch.testing.assert_close(training_target("v", x0, eps, alpha, sigma), ddpm.get_velocity(x0, eps, t),
                               rtol=1e-5, atol=1e-6)
    # SD3 / FlowMatchEulerDiscreteScheduler: x_t = (1 - t) x0 + t eps, the network learns eps - x0
    flow = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ts = flow.timesteps[[0, 300, 700, 999]]
    x_t = flow.scale_noise(x0, ts, eps)
    level = FlowSchedule.level(ts.double() / 1000)
    a, s = PROCESSES["flow"].alpha_sigma(level)
    a, s = a.float().reshape(-1, 1, 1, 1), s.float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(a * x0 + s * eps, x_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(training_target("flow", x0, eps, a, s), eps - x0)
    torch.testing.assert_close(PROCESSES["flow"].model_time(level).float(), ts, rtol=1e-6, atol=1e-4)


def test_edm_scalings_equal_k_diffusion_and_table_1(kd) -> None:
    sigma = torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=torch.float64)
    for sigma_data in (0.5, 1.0):
        ref = kd.layers.Denoiser(torch.nn.Identity(), sigma_data=sigma_data)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, sigma_data)
        for ours, theirs in zip((c_skip, c_out, c_in), ref.get_scalings(sigma)):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
        torch.testing.assert_close(c_noise, sigma.log() / 4)
    c_skip, c_out, c_in, c_noise = edm_scalings(2.0, 0.5)
    assert c_skip == pytest.approx(0.25 / 4.25) and c_out == pytest.approx(1 / math.sqrt(4.25))
    assert c_in == pytest.approx(1 / math.sqrt(4.25)) and c_noise == pytest.approx(math.log(2) / 4)


def test_edm_denoiser_equals_k_diffusion_denoiser(kd) -> None:
    """D(x; s) = c_skip x + c_out F(c_in x; c_noise) for a network F, as k-diffusion's layers.Denoiser computes it."""
    def network(x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x + c_noise.reshape(-1, 1, 1, 1))

    x = sample(2)[0] * 3
    sigma = torch.tensor([0.01, 0.5, 3.0, 40.0], dtype=torch.float64)
    ref = kd.layers.Denoiser(lambda x_in, s: network(x_in, s.log() / 4), sigma_data=0.5)
    alpha, sig = EDMSchedule().alpha_sigma(sigma)
    scale = input_scale("edm", alpha, sig).reshape(-1, 1, 1, 1)
    s4 = sig.reshape(-1, 1, 1, 1)
    ours = to_x0("edm", network(x * scale, EDMSchedule().model_time(sigma)), x, 1.0, s4)
    torch.testing.assert_close(ours, ref(x, sigma), rtol=1e-12, atol=1e-12)
    assert input_scale("v", 0.5, 0.5) == 1.0


def test_unknown_parameterization_names_the_choices() -> None:
    with pytest.raises(ValueError, match="expected one of eps, x0, v, flow, edm"):
        check_parameterization("score")
    with pytest.raises(ValueError, match="'score' unknown"):
        training_target("score", torch.zeros(1), torch.zeros(1), 1.0, 0.0)
