"""DDPM: schedule buffers under the original names, loss targets, conditioning routing, EMA, checkpoints."""
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ldm.models.diffusion.ddpm import DDPM, DiffusionWrapper

UNET = {
    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "params": dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[],
                   num_res_blocks=1, channel_mult=[1, 2], num_heads=4),
}

ORIGINAL_BUFFERS = [
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
]


def make_ddpm(**kw):
    params = dict(unet_config=UNET, timesteps=100, image_size=8, channels=3, linear_start=0.00085,
                  linear_end=0.012, monitor=None)
    params.update(kw)
    return DDPM(**params)


def test_buffers_have_original_names_and_values():
    model = make_ddpm(use_ema=True)
    sd = model.state_dict()
    for name in ORIGINAL_BUFFERS:
        assert name in sd, name
    assert "lvlb_weights" not in sd  # non-persistent, as in the original
    assert any(k.startswith("model_ema.diffusion_model") for k in sd)
    assert "model_ema.decay" in sd and "model_ema.num_updates" in sd
    assert "model.diffusion_model.input_blocks.0.0.weight" in sd
    ref = DDPMScheduler(num_train_timesteps=100, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(model.alphas_cumprod, ref.alphas_cumprod, rtol=1e-6, atol=1e-7)
    betas = model.betas.double().numpy()
    a = np.cumprod(1 - betas)
    a_prev = np.append(1.0, a[:-1])
    post_var = betas * (1 - a_prev) / (1 - a)
    np.testing.assert_allclose(model.posterior_variance.numpy(), post_var, rtol=1e-5)
    np.testing.assert_allclose(model.posterior_log_variance_clipped.numpy(), np.log(np.maximum(post_var, 1e-20)),
                               rtol=1e-5)
    np.testing.assert_allclose(model.posterior_mean_coef2.numpy(), (1 - a_prev) * np.sqrt(1 - betas) / (1 - a),
                               rtol=1e-5)


def test_v_target_matches_diffusers_velocity():
    model = make_ddpm(parameterization="v", use_ema=False)
    ref = DDPMScheduler(num_train_timesteps=100, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    gen = torch.Generator().manual_seed(0)
    x, noise = torch.randn(3, 3, 8, 8, generator=gen), torch.randn(3, 3, 8, 8, generator=gen)
    t = torch.tensor([0, 50, 99])
    # the process is computed in float64 (within 2e-7 of the exact values); diffusers' alphas_cumprod is a float32
    # cumprod, off by up to 1.5e-7, which moves its outputs by up to ~1.5e-6: the reference tolerance allows for that
    exact_a = torch.cumprod(1 - torch.as_tensor(model.schedule.betas, dtype=torch.float64), 0)[t].reshape(-1, 1, 1, 1)
    exact = exact_a.sqrt() * x.double() + (1 - exact_a).sqrt() * noise.double()
    torch.testing.assert_close(model.q_sample(x, t, noise).double(), exact, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.get_v(x, noise, t), ref.get_velocity(x, noise, t), rtol=1e-5, atol=5e-6)
    torch.testing.assert_close(model.q_sample(x, t, noise), ref.add_noise(x, noise, t), rtol=1e-5, atol=5e-6)
    v = model.get_v(x, noise, t)
    xt = model.q_sample(x, t, noise)
    torch.testing.assert_close(model.predict_start_from_z_and_v(xt, t, v), x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.predict_eps_from_z_and_v(xt, t, v), noise, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.predict_start_from_noise(xt, t, noise), x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_loss_is_zero_for_a_perfect_model(parameterization):
    model = make_ddpm(parameterization=parameterization, use_ema=False)
    x, noise, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([10, 90])
    target = {"eps": noise, "x0": x, "v": model.get_v(x, noise, t)}[parameterization]
    model.apply_model = lambda x_noisy, t_, cond=None: target
    loss, logs = model.p_losses(x, t, noise=noise)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    assert set(logs) >= {"train/loss_simple", "train/loss_vlb", "train/loss"}
    model.apply_model = lambda x_noisy, t_, cond=None: target + 1.0
    loss, logs = model.p_losses(x, t, noise=noise)
    assert loss.item() == pytest.approx(1.0, rel=1e-5)  # l2 of a unit offset


def test_l1_loss_and_elbo_weight():
    model = make_ddpm(loss_type="l1", original_elbo_weight=0.5, l_simple_weight=2.0, use_ema=False)
    x, noise, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([10, 90])
    model.apply_model = lambda x_noisy, t_, cond=None: noise - 0.5
    loss, logs = model.p_losses(x, t, noise=noise)
    expected_vlb = (model.lvlb_weights[t] * 0.5).mean()
    assert logs["train/loss_vlb"].item() == pytest.approx(expected_vlb.item(), rel=1e-5)
    assert loss.item() == pytest.approx(2.0 * 0.5 + 0.5 * expected_vlb.item(), rel=1e-5)


def test_learned_logvar_is_a_parameter_and_weights_the_loss():
    model = make_ddpm(learn_logvar=True, logvar_init=1.0, use_ema=False)
    assert isinstance(model.logvar, torch.nn.Parameter) and "logvar" in model.state_dict()
    x, noise, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    model.apply_model = lambda x_noisy, t_, cond=None: noise + 1.0
    loss, logs = model.p_losses(x, t, noise=noise)
    assert loss.item() == pytest.approx(1.0 / np.e + 1.0, rel=1e-5)
    assert "train/loss_gamma" in logs
    assert any(p is model.logvar for p in model.trainable_parameters())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="parameterization 'eps2' unknown"):
        make_ddpm(parameterization="eps2")
    with pytest.raises(ValueError, match="loss_type 'huber' unknown"):
        make_ddpm(loss_type="huber")
    with pytest.raises(ValueError, match="conditioning_key 'cross' unknown"):
        make_ddpm(conditioning_key="cross")
    model = make_ddpm(use_ema=False)
    with pytest.raises(ValueError, match="learning_rate is not set"):
        model.configure_optimizers()
    with pytest.raises(KeyError, match="batch has no key 'image'"):
        model.get_input({"jpg": torch.zeros(1, 8, 8, 3)}, "image")


def test_ema_scope_swaps_and_restores():
    model = make_ddpm(use_ema=True)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(1.0)
    trained = {k: v.clone() for k, v in model.model.state_dict().items()}
    with model.ema_scope():
        for k, v in model.model.state_dict().items():
            if v.dtype.is_floating_point and k in dict(model.model.named_parameters()):
                torch.testing.assert_close(v, before[k])
    for k, v in model.model.state_dict().items():
        torch.testing.assert_close(v, trained[k])


def test_init_from_ckpt_ignore_keys_and_make_it_fit(tmp_path):
    src = make_ddpm(use_ema=False)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.05)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "m.ckpt")
    same = make_ddpm(use_ema=False, ckpt_path=str(tmp_path / "m.ckpt"))
    for k, v in src.state_dict().items():
        torch.testing.assert_close(same.state_dict()[k], v)
    skipped = make_ddpm(use_ema=False, ckpt_path=str(tmp_path / "m.ckpt"), ignore_keys=["model.diffusion_model.out"])
    assert torch.count_nonzero(skipped.state_dict()["model.diffusion_model.out.2.weight"]) == 0  # not loaded
    assert torch.equal(skipped.state_dict()["model.diffusion_model.time_embed.0.weight"],
                       src.state_dict()["model.diffusion_model.time_embed.0.weight"])
    wide = dict(UNET, params=dict(UNET["params"], in_channels=5))
    fitted = make_ddpm(use_ema=False, unet_config=wide, ckpt_path=str(tmp_path / "m.ckpt"), make_it_fit=True)
    w = fitted.state_dict()["model.diffusion_model.input_blocks.0.0.weight"]
    assert w.shape[1] == 5
    torch.testing.assert_close(w[:, :3], src.state_dict()["model.diffusion_model.input_blocks.0.0.weight"])
    assert torch.count_nonzero(w[:, 3:]) == 0  # new input channels start at zero


class _Recorder(torch.nn.Module):
    def forward(self, x, t, context=None, y=None):
        self.seen = dict(x=x, context=context, y=y)
        return x[:, :1]


@pytest.mark.parametrize("key", [None, "concat", "crossattn", "hybrid", "adm", "hybrid-adm", "crossattn-adm"])
def test_diffusion_wrapper_routes_conditioning(key, monkeypatch):
    monkeypatch.setattr("ldm.models.diffusion.ddpm.instantiate_from_config", lambda cfg: _Recorder())
    wrapper = DiffusionWrapper({"target": "unused"}, key)
    x, t = torch.zeros(2, 4, 3, 3), torch.tensor([1, 2])
    concat, ctx, adm = [torch.ones(2, 2, 3, 3)], [torch.ones(2, 5, 7), torch.ones(2, 1, 7)], torch.ones(2, 9)
    wrapper(x, t, c_concat=concat, c_crossattn=ctx, c_adm=adm)
    seen = wrapper.diffusion_model.seen
    assert seen["x"].shape[1] == (6 if key in ("concat", "hybrid", "hybrid-adm") else 4)
    if key in ("crossattn", "hybrid", "hybrid-adm", "crossattn-adm"):
        assert seen["context"].shape == (2, 6, 7)  # cross-attention contexts concatenated along tokens
    else:
        assert seen["context"] is None
    if key in ("hybrid-adm", "crossattn-adm"):
        assert seen["y"] is adm
    elif key == "adm":
        assert seen["y"] is ctx[0]
    else:
        assert seen["y"] is None


def test_diffusion_wrapper_names_missing_conditioning(monkeypatch):
    monkeypatch.setattr("ldm.models.diffusion.ddpm.instantiate_from_config", lambda cfg: _Recorder())
    with pytest.raises(ValueError, match="conditioning_key 'crossattn' needs c_crossattn"):
        DiffusionWrapper({"target": "unused"}, "crossattn")(torch.zeros(1, 4, 3, 3), torch.tensor([1]))


def test_lightning_fit_with_scheduler_and_ema_validation():
    import pytorch_lightning as pl

    torch.manual_seed(0)
    sched = {"target": "ldm.lr_scheduler.LambdaLinearScheduler",
             "params": {"warm_up_steps": [4], "cycle_lengths": [10**13], "f_start": [0.0], "f_max": [1.0], "f_min": [1.0]}}
    model = make_ddpm(scheduler_config=sched, use_ema=True)
    model.learning_rate = 1e-3
    data = torch.utils.data.DataLoader([{"image": torch.rand(8, 8, 3) * 2 - 1} for _ in range(8)], batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         num_sanity_val_steps=0, val_check_interval=2)
    trainer.fit(model, data, data)
    metrics = trainer.callback_metrics
    assert {"val/loss_simple", "val/loss_simple_ema", "train/loss", "lr_abs"} <= set(metrics), set(metrics)
    # LambdaLR stepped per step: three steps into a four-step warm-up
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 3 / 4)
    assert model.model_ema.num_updates.item() == 3


def test_reset_ema_restarts_the_average_from_the_checkpoint(tmp_path):
    src = make_ddpm(use_ema=True)
    with torch.no_grad():
        for p in src.model.parameters():
            p.add_(0.5)
        src.model_ema.num_updates += 7
    torch.save({"state_dict": src.state_dict()}, tmp_path / "m.ckpt")
    kept = make_ddpm(use_ema=True, ckpt_path=str(tmp_path / "m.ckpt"))
    assert kept.model_ema.num_updates.item() == 7
    w = "diffusion_modelinput_blocks00weight"
    assert not torch.equal(kept.model_ema.state_dict()[w], src.model.diffusion_model.input_blocks[0][0].weight)
    reset = make_ddpm(use_ema=True, ckpt_path=str(tmp_path / "m.ckpt"), reset_ema=True, reset_num_ema_updates=True)
    assert torch.equal(reset.model_ema.state_dict()[w], src.model.diffusion_model.input_blocks[0][0].weight)
    assert reset.model_ema.num_updates.item() == 0
    with pytest.raises(ValueError, match="reset_ema=True needs a ckpt_path"):
        make_ddpm(use_ema=True, reset_ema=True)
    with pytest.raises(ValueError, match="need use_ema=True"):
        make_ddpm(use_ema=False, reset_num_ema_updates=True)
