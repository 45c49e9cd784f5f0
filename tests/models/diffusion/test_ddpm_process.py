"""DDPM holds one process model (`process_config`): the VP default with its original buffers, zero-SNR, EDM, flow."""
from __future__ import annotations

import math

import pytest
import torch

from ldm.models.diffusion.ddpm import DDPM
from ldm.sampling.schedule import EDMSchedule, FlowSchedule, NoiseSchedule

UNET = {
    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "params": dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[],
                   num_res_blocks=1, channel_mult=[1, 2], num_heads=4),
}


def make_ddpm(**kw) -> DDPM:
    params = dict(unet_config=UNET, timesteps=100, image_size=8, channels=3, linear_start=0.00085,
                  linear_end=0.012, monitor=None, use_ema=False)
    params.update(kw)
    return DDPM(**params)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, 8, 8, generator=gen), torch.randn(3, 3, 8, 8, generator=gen)


def test_default_is_the_vp_schedule_and_q_sample_is_the_schedules() -> None:
    model = make_ddpm()
    expected = NoiseSchedule.from_config("linear", 100, linear_start=0.00085, linear_end=0.012)
    assert isinstance(model.schedule, NoiseSchedule) and torch.equal(model.schedule.betas, expected.betas)
    for name, value in expected.buffers().items():  # the original buffers, registered from the one schedule
        assert torch.equal(getattr(model, name), value), name
    x, noise = batch()
    t = torch.tensor([0, 50, 99])
    assert torch.equal(model.q_sample(x, t, noise), model.schedule.q_sample(x, t, noise))


def test_zero_terminal_snr_by_process_config() -> None:
    model = make_ddpm(parameterization="v", process_config={"target": "ldm.sampling.schedule.NoiseSchedule",
                                                            "params": {"zero_terminal_snr": True}})
    assert model.alphas_cumprod[-1] == 0 and model.schedule.zero_terminal_snr
    assert bool(torch.isfinite(model.lvlb_weights).all())
    x, noise = batch(1)
    t = torch.full((3,), 99)
    assert torch.equal(model.q_sample(x, t, noise), noise)  # pure noise at the last timestep
    torch.testing.assert_close(model.get_v(x, noise, t), -x)  # v = alpha eps - sigma x0 with alpha = 0, sigma = 1
    loss, _ = model.p_losses(x, t, noise)
    assert torch.isfinite(loss)
    eps_model = make_ddpm(process_config={"target": "ldm.sampling.schedule.NoiseSchedule",
                                          "params": {"zero_terminal_snr": True}})
    assert bool(torch.isfinite(eps_model.lvlb_weights).all())


def test_flow_process() -> None:
    model = make_ddpm(parameterization="flow", process_config={"target": "ldm.sampling.schedule.FlowSchedule",
                                                               "params": {"shift": 3.0}})
    assert model.schedule == FlowSchedule(shift=3.0) and model.num_timesteps == 1000
    assert "betas" not in model.state_dict() and torch.equal(model.lvlb_weights, torch.ones(1000))
    x, noise = batch(2)
    t = torch.tensor([0, 500, 999])
    tk = model.schedule.warp((t.double() + 1) / 1000).float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(model.q_sample(x, t, noise), (1 - tk) * x + tk * noise)
    loss, _ = model.p_losses(x, t, noise)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(model.apply_model(model.q_sample(x, t, noise), t),
                                                                  noise - x))


def test_edm_process_and_preconditioning() -> None:
    model = make_ddpm(parameterization="edm", process_config={"target": "ldm.sampling.schedule.EDMSchedule",
                                                              "params": {"sigma_data": 0.5}})
    assert model.schedule == EDMSchedule(sigma_data=0.5)
    x, noise = batch(3)
    t = torch.tensor([0, 500, 999])
    loss, _ = model.p_losses(x, t, noise)
    assert torch.isfinite(loss)


def test_unknown_process_or_parameterization_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="is not a ldm.sampling.schedule.Schedule"):
        make_ddpm(process_config={"target": "torch.nn.Identity"})
    with pytest.raises(ValueError, match="parameterization 'score' unknown"):
        make_ddpm(parameterization="score")


def test_log_images_draws_with_a_registry_sampler_on_any_process() -> None:
    batch = {"image": torch.rand(2, 8, 8, 3) * 2 - 1}
    for model in (make_ddpm(), make_ddpm(parameterization="flow",
                                         process_config={"target": "ldm.sampling.schedule.FlowSchedule"})):
        log = model.log_images(batch, N=2, sampler="heun", ddim_steps=3)
        assert log["samples"].shape == (2, 3, 8, 8) and bool(torch.isfinite(log["samples"]).all())
        assert log["denoise_row"].shape[0] == 3  # one grid image of the intermediates
    assert model.schedule == FlowSchedule() and math.isinf(model.schedule.sigma_max)  # heun ran from pure noise


def test_a_checkpoint_with_another_schedule_is_warned_about(caplog) -> None:
    model, other = make_ddpm(), make_ddpm(linear_end=0.02)
    with caplog.at_level("WARNING"):
        model.load_state_dict(make_ddpm().state_dict())
    assert "differ from the schedule" not in caplog.text
    with caplog.at_level("WARNING"):
        model.load_state_dict(other.state_dict())
    assert "checkpoint's alphas_cumprod differ from the schedule of the config" in caplog.text
