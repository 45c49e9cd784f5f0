"""Training recipes on the models: the default loss is bit-identical to the original p_losses (values and
gradients), loss_config switches the parts, LatentDiffusion.p_losses keeps the original argument order."""
import copy
import inspect

import pytest
import torch

from ldm.models.diffusion.ddpm import DDPM, LatentDiffusion
from ldm.sampling.loss import DiffusionLoss, LogitNormalTimesteps, MinSNRWeighting, UniformTimesteps, UnitWeighting
from ldm.util import instantiate_from_config


def unet(in_channels, context_dim=None):
    params = dict(image_size=8, in_channels=in_channels, out_channels=in_channels, model_channels=32,
                  attention_resolutions=[1] if context_dim else [], num_res_blocks=1, channel_mult=[1, 2],
                  num_head_channels=16)
    if context_dim:
        params.update(use_spatial_transformer=True, context_dim=context_dim)
    return {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": params}


def make_ddpm(**kw):
    params = dict(unet_config=unet(3), timesteps=100, image_size=8, channels=3, linear_start=0.00085,
                  linear_end=0.012, monitor=None, use_ema=False)
    params.update(kw)
    return DDPM(**params)


def make_ldm(**kw):
    first_stage = {"target": "ldm.models.autoencoder.AutoencoderKL",
                   "params": {"embed_dim": 4, "lossconfig": {"target": "torch.nn.Identity"},
                              "ddconfig": dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3,
                                               ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
                                               dropout=0.0)}}
    cond_stage = {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                  "params": {"embed_dim": 16, "n_classes": 5, "key": "class_label"}}
    params = dict(linear_start=0.0015, linear_end=0.0195, timesteps=100, first_stage_key="image",
                  cond_stage_key="class_label", image_size=8, channels=4, monitor=None, use_ema=False,
                  conditioning_key="crossattn", cond_stage_trainable=True, unet_config=unet(4, 16),
                  first_stage_config=first_stage, cond_stage_config=cond_stage)
    params.update(kw)
    return instantiate_from_config({"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params})


def original_p_losses(model, x_start, t, cond=None):
    """DDPM.p_losses (and LatentDiffusion's) as they stood before loss_config, kept as the reference."""
    noise = torch.randn_like(x_start)
    x_noisy = model.q_sample(x_start=x_start, t=t, noise=noise)
    model_output = model.apply_model(x_noisy, t, cond)
    target = {"eps": lambda: noise, "x0": lambda: x_start,
              "v": lambda: model.get_v(x_start, noise, t)}[model.parameterization]()
    if model.loss_type == "l1":
        loss_per_sample = (target - model_output).abs().mean(dim=[1, 2, 3])
    else:
        loss_per_sample = torch.nn.functional.mse_loss(target, model_output, reduction="none").mean(dim=[1, 2, 3])
    prefix = "train" if model.training else "val"
    loss_dict = {f"{prefix}/loss_simple": loss_per_sample.mean()}
    logvar_t = model.logvar.to(model.device)[t]
    loss = loss_per_sample / torch.exp(logvar_t) + logvar_t
    if model.learn_logvar:
        loss_dict[f"{prefix}/loss_gamma"] = loss.mean()
        loss_dict["logvar"] = model.logvar.data.mean()
    loss = model.l_simple_weight * loss.mean()
    loss_vlb = (model.lvlb_weights[t] * loss_per_sample).mean()
    loss_dict[f"{prefix}/loss_vlb"] = loss_vlb
    loss = loss + model.original_elbo_weight * loss_vlb
    loss_dict[f"{prefix}/loss"] = loss
    return loss, loss_dict


def original_forward(model, x, c=None):
    """DDPM.forward / LatentDiffusion.forward before loss_config: uniform t from torch.randint, then the loss."""
    t = torch.randint(0, model.num_timesteps, (x.shape[0],), device=model.device).long()
    if c is not None and model.cond_stage_trainable:
        c = model.get_learned_conditioning(c)
    return original_p_losses(model, x, t, cond=c)


def loss_and_grads(model, fn, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, logs = fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), {k: v.detach() for k, v in logs.items()}, grads


def assert_bit_identical(a, b):
    loss_a, logs_a, grads_a = a
    loss_b, logs_b, grads_b = b
    assert torch.equal(loss_a, loss_b), (loss_a.item(), loss_b.item())
    assert logs_a.keys() == logs_b.keys()
    for key in logs_a:
        assert torch.equal(logs_a[key], logs_b[key]), key
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


UNIFORM_UNIT = {"target": "ldm.sampling.loss.DiffusionLoss",
                "params": {"sigma_sampler_config": {"target": "ldm.sampling.loss.UniformTimesteps"},
                           "loss_weighting_config": {"target": "ldm.sampling.loss.UnitWeighting"}}}


@pytest.mark.parametrize("kw", [
    dict(parameterization="eps"),
    dict(parameterization="x0", loss_type="l1", original_elbo_weight=0.5, l_simple_weight=2.0),
    dict(parameterization="v", learn_logvar=True, logvar_init=0.5),
], ids=["eps-l2", "x0-l1-elbo", "v-logvar"])
def test_default_loss_is_bit_identical_to_the_original(kw):
    torch.manual_seed(0)
    model = make_ddpm(**kw)
    x = torch.randn(4, 3, 8, 8)
    reference = loss_and_grads(model, lambda: original_forward(model, x), seed=11)
    assert_bit_identical(loss_and_grads(model, lambda: model(x), seed=11), reference)
    # uniform sampler + unit weight, spelled out as a loss_config, is the same loss
    explicit = make_ddpm(loss_config=UNIFORM_UNIT, **kw)
    explicit.load_state_dict(model.state_dict())
    assert isinstance(explicit.diffusion_loss.sampler, UniformTimesteps)
    assert isinstance(explicit.diffusion_loss.weighting, UnitWeighting)
    assert_bit_identical(loss_and_grads(explicit, lambda: explicit(x), seed=11), reference)


def test_latent_diffusion_default_loss_is_bit_identical_to_the_original():
    torch.manual_seed(0)
    model = make_ldm()
    batch = {"image": torch.rand(4, 16, 16, 3) * 2 - 1, "class_label": torch.tensor([0, 1, 2, 3])}

    def reference():
        z, c = model.get_input(batch, "image")
        return original_forward(model, z, c)

    expected = loss_and_grads(model, reference, seed=5)
    got = loss_and_grads(model, lambda: model.shared_step(batch), seed=5)
    assert_bit_identical(got, expected)
    assert any(name.startswith("cond_stage_model.") for name in got[2])  # the conditioner got its gradients


def test_latent_diffusion_p_losses_takes_the_original_argument_order():
    assert list(inspect.signature(LatentDiffusion.p_losses).parameters) == ["self", "x_start", "cond", "t", "noise"]
    torch.manual_seed(0)
    model = make_ldm()
    with torch.no_grad():  # the UNet's output and attention projections start at zero: wake them up
        for p in model.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    z, t, noise = torch.randn(2, 4, 8, 8), torch.tensor([3, 80]), torch.randn(2, 4, 8, 8)
    c = model.get_learned_conditioning({"class_label": torch.tensor([0, 1])})
    other = model.get_learned_conditioning({"class_label": torch.tensor([2, 3])})
    loss, logs = model.p_losses(z, c, t, noise)  # positionally, as latent-diffusion's callers do
    same, _ = DDPM.p_losses(model, z, t, noise, c)
    assert torch.equal(loss, same) and "train/loss_simple" in logs
    assert not torch.equal(model.p_losses(z, other, t, noise)[0], loss)  # the conditioning reaches the UNet


def test_loss_config_switches_sampler_and_weighting():
    cfg = {"target": "ldm.sampling.loss.DiffusionLoss",
           "params": {"sigma_sampler_config": {"target": "ldm.sampling.loss.LogitNormalTimesteps"},
                      "loss_weighting_config": {"target": "ldm.sampling.loss.MinSNRWeighting",
                                                "params": {"gamma": 5.0}}}}
    torch.manual_seed(0)
    model = make_ddpm(loss_config=cfg, parameterization="v", loss_type="l1")
    assert isinstance(model.diffusion_loss.sampler, LogitNormalTimesteps)
    assert isinstance(model.diffusion_loss.weighting, MinSNRWeighting)
    assert model.diffusion_loss.loss_type == "l1"  # the model's own loss parameters reach the loss
    seen = []
    original = DiffusionLoss.forward

    def spy(self, m, x_start, t, noise=None, cond=None):
        seen.append(t)
        return original(self, m, x_start, t, noise=noise, cond=cond)

    x = torch.randn(64, 3, 8, 8)
    DiffusionLoss.forward = spy
    try:
        torch.manual_seed(3)
        model(x)
    finally:
        DiffusionLoss.forward = original
    torch.manual_seed(3)
    assert torch.equal(seen[0], LogitNormalTimesteps()(64, model.schedule))  # forward drew t from the sampler
    # the weighted loss differs from the unweighted one on the same draw
    plain = copy.deepcopy(model)
    plain.diffusion_loss.weighting = UnitWeighting()
    t, noise = torch.tensor([1, 50, 99]), torch.randn(3, 3, 8, 8)
    weighted, _ = model.p_losses(x[:3], t, noise=noise)
    unweighted, _ = plain.p_losses(x[:3], t, noise=noise)
    assert not torch.isclose(weighted, unweighted)


FLOW = dict(parameterization="flow",
            process_config={"target": "ldm.sampling.schedule.FlowSchedule", "params": {"shift": 1.0}},
            loss_config={"target": "ldm.sampling.loss.DiffusionLoss",
                         "params": {"sigma_sampler_config": {"target": "ldm.sampling.loss.LogitNormalTimesteps"}}})


def test_flow_network_sees_t_times_1000_and_learns_the_velocity():
    torch.manual_seed(0)
    model = make_ddpm(**FLOW)
    seen = []
    model.apply_model = lambda x, t, cond=None: seen.append((x, t)) or torch.zeros_like(x)
    x0, noise, t = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8), torch.tensor([0.0, 499.0, 998.5])
    loss, _ = model.p_losses(x0, t, noise=noise)
    flow_time = (t + 1) / 1000  # the FlowSchedule grid: t_k = (k + 1) / T with shift 1
    torch.testing.assert_close(seen[0][1], flow_time * 1000)  # SD3's convention for the time input
    tk = flow_time.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(seen[0][0], (1 - tk) * x0 + tk * noise)
    torch.testing.assert_close(loss, (noise - x0).pow(2).mean())  # zero output: the loss is ||u||^2, u = eps - x0


@pytest.mark.slow
def test_flow_matching_latent_diffusion_trains_on_shapes():
    """A flow-matching LatentDiffusion (FlowSchedule, velocity target, logit-normal t) on the built-in shapes."""
    import pytorch_lightning as pl

    from ldm.data.shapes import ShapesTrain

    bert = {"target": "ldm.modules.encoders.modules.BERTEmbedder",
            "params": {"n_embed": 16, "n_layer": 1, "vocab_size": 128, "max_seq_len": 12,
                       "tokenizer_path": "configs/latent-diffusion/shapes-tokenizer"}}
    torch.manual_seed(0)
    model = make_ldm(cond_stage_config=bert, cond_stage_key="caption", **FLOW)
    with torch.no_grad():  # posterior variance ~0: the latents are a function of the image
        model.first_stage_model.quant_conv.bias[4:] = -20.0
    model.learning_rate = 2e-3
    losses = []

    class Track(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    loader = torch.utils.data.DataLoader(ShapesTrain(size=16, length=400), batch_size=8, shuffle=True)
    trainer = pl.Trainer(accelerator="cpu", max_steps=50, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Track()])
    trainer.fit(model, loader)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
