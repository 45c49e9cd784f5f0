"""Task models on tiny configs and built-in shapes data: inpainting (9-channel UNet), latent upscaling with
noise augmentation, concat super-resolution; fine-tuning a 4-channel checkpoint; the published SD2 configs."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.data.inpainting import InpaintingDataset
from ldm.data.shapes import ShapesSR, ShapesTrain
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddpm import LatentDiffusion, LatentInpaintDiffusion, LatentUpscaleDiffusion
from ldm.util import instantiate_from_config
from tiny_ldm import LATENT, SIZE, batch_of, loader, model_config, randomise_zero_convs, train
from tiny_ldm import unet as tiny_unet

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "stable-diffusion"
FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight"


def unet(in_channels, text=True, num_classes=None):
    return tiny_unet(in_channels, context_dim=16 if text else None, num_classes=num_classes)


def inpaint_config(text_stage, **extra):
    return model_config("ldm.models.diffusion.ddpm.LatentInpaintDiffusion", unet(9), text_stage, "hybrid", **extra)


def upscale_config(text_stage, **extra):
    low_scale = {"target": "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation",
                 "params": {"noise_schedule_config": {"linear_start": 1e-4, "linear_end": 2e-2}, "max_noise_level": 350}}
    return model_config("ldm.models.diffusion.ddpm.LatentUpscaleDiffusion", unet(7, num_classes=1000), text_stage,
                        "hybrid-adm", low_scale_config=low_scale, low_scale_key="LR_image", **extra)


def first_conv(model):
    return model.state_dict()[FIRST_CONV].clone()


def test_inpainting_trains_samples_with_guidance_and_logs(text_stage):
    torch.manual_seed(0)
    model = instantiate_from_config(inpaint_config(text_stage))
    assert isinstance(model, LatentInpaintDiffusion) and model.concat_keys == ("mask", "masked_image")
    data = InpaintingDataset(ShapesTrain(size=SIZE, length=64), seed=1)
    before = first_conv(model)
    train(model, data)
    after = first_conv(model)
    assert not torch.equal(after[:, 4:], before[:, 4:])  # the gradient reached the mask / masked-image channels

    model.eval()
    batch = batch_of(data)
    z, cond = model.get_input(batch, "image")
    assert z.shape == (2, 4, LATENT, LATENT) and set(cond) == {"c_concat", "c_crossattn"}
    c_cat = cond["c_concat"][0]
    assert c_cat.shape == (2, 5, LATENT, LATENT)
    mask = batch["mask"].permute(0, 3, 1, 2)
    assert torch.equal(c_cat[:, :1], torch.nn.functional.interpolate(mask, size=(LATENT, LATENT)))
    uc = {"c_concat": cond["c_concat"], "c_crossattn": [model.get_unconditional_conditioning(2, "")]}
    sampler = DDIMSampler(model)
    kw = dict(S=4, batch_size=2, shape=(4, LATENT, LATENT), verbose=False, seeds=[3, 4])
    plain, _ = sampler.sample(conditioning=cond, **kw)
    guided, _ = sampler.sample(conditioning=cond, unconditional_guidance_scale=3.0, unconditional_conditioning=uc, **kw)
    other_mask = {"c_concat": [torch.cat([1 - c_cat[:, :1], c_cat[:, 1:]], 1)], "c_crossattn": cond["c_crossattn"]}
    remasked, _ = sampler.sample(conditioning=other_mask, **kw)
    assert plain.shape == guided.shape == (2, 4, LATENT, LATENT) and torch.isfinite(guided).all()
    assert not torch.allclose(plain, guided) and not torch.allclose(plain, remasked)

    log = model.log_images(batch, N=2, ddim_steps=4, plot_progressive_rows=False, unconditional_guidance_scale=2.0,
                           unconditional_guidance_label=[""])
    for key in ("inputs", "reconstruction", "conditioning", "samples", "samples_cfg_scale_2.00", "masked_image"):
        assert log[key].shape == (2, 3, SIZE, SIZE), key
    assert torch.equal(log["masked_image"], batch["masked_image"].permute(0, 3, 1, 2))


def test_finetuning_from_a_4_channel_checkpoint_zero_initialises_the_new_channels(text_stage, tmp_path):
    torch.manual_seed(0)
    base = instantiate_from_config(model_config("ldm.models.diffusion.ddpm.LatentDiffusion", unet(4), text_stage,
                                                "crossattn"))
    with torch.no_grad():  # make the EMA differ from the weights, to see that both are carried over
        base.model_ema.diffusion_modelinput_blocks00weight.add_(1.0)
    path = tmp_path / "sd4.ckpt"
    torch.save({"state_dict": base.state_dict()}, path)
    model = instantiate_from_config(inpaint_config(text_stage, ckpt_path=str(path)))
    base_sd, sd = base.state_dict(), model.state_dict()
    widened = (FIRST_CONV, "model_ema.diffusion_modelinput_blocks00weight")
    for key in widened:
        assert sd[key].shape == (32, 9, 3, 3)
        assert torch.equal(sd[key][:, :4], base_sd[key]) and not sd[key][:, 4:].any(), key
    assert set(sd) == set(base_sd)
    assert all(torch.equal(sd[key], value) for key, value in base_sd.items() if key not in widened)
    # at initialisation the 9-channel model predicts what the 4-channel one does, whatever the concat input
    base.eval(), model.eval()
    x, t = torch.randn(2, 4, LATENT, LATENT), torch.tensor([5, 60])
    c = base.get_learned_conditioning(["a red circle on a white background"] * 2)
    extra = {"c_concat": [torch.randn(2, 5, LATENT, LATENT)], "c_crossattn": [c]}
    torch.testing.assert_close(model.apply_model(x, t, extra), base.apply_model(x, t, c), rtol=1e-5, atol=1e-5)

    # a checkpoint of the widened model (a resume) loads unchanged; a too narrow one is refused by name
    path9 = tmp_path / "sd9.ckpt"
    with torch.no_grad():
        model.model.diffusion_model.input_blocks[0][0].weight[:, 4:] = 0.5
    torch.save({"state_dict": model.state_dict()}, path9)
    resumed = instantiate_from_config(inpaint_config(text_stage, ckpt_path=str(path9)))
    assert torch.equal(first_conv(resumed), first_conv(model))
    with pytest.raises(ValueError, match="keep_finetune_dims=5"):
        instantiate_from_config(inpaint_config(text_stage, ckpt_path=str(path), keep_finetune_dims=5))


def test_upscaler_trains_samples_with_noise_levels_and_logs(text_stage):
    torch.manual_seed(0)
    model = instantiate_from_config(upscale_config(text_stage, parameterization="v"))
    assert isinstance(model, LatentUpscaleDiffusion)
    data = ShapesSR(size=SIZE, length=64, degradation="bsrgan_light", downscale_f=4)
    before, label_before = first_conv(model), model.model.diffusion_model.label_emb.weight.detach().clone()
    train(model, data)
    assert not torch.equal(first_conv(model)[:, 4:], before[:, 4:])  # low-res channels get gradients
    assert not torch.equal(model.model.diffusion_model.label_emb.weight, label_before)  # and so does the noise level

    model.eval()
    batch = batch_of(data)
    z, cond = model.get_input(batch, "image")
    assert set(cond) == {"c_concat", "c_crossattn", "c_adm"}
    assert cond["c_concat"][0].shape == (2, 3, LATENT, LATENT) and cond["c_adm"].max() < 350
    fixed = model.low_scale_model(batch["LR_image"].permute(0, 3, 1, 2), noise_level=torch.tensor([20, 20]))[0]
    kw = dict(S=4, batch_size=2, shape=(4, LATENT, LATENT), verbose=False, seeds=[3, 4])
    cond = {"c_concat": [fixed], "c_crossattn": cond["c_crossattn"], "c_adm": torch.tensor([20, 20])}
    samples, _ = DDIMSampler(model).sample(conditioning=cond, **kw)
    uc = model.task_unconditional_conditioning(cond, 2, [""])
    assert torch.equal(uc["c_adm"], cond["c_adm"]) and uc["c_concat"] is cond["c_concat"]
    guided, _ = DDIMSampler(model).sample(conditioning=cond, unconditional_guidance_scale=4.0,
                                          unconditional_conditioning=uc, **kw)
    louder = {**cond, "c_adm": torch.tensor([300, 300])}
    other_level, _ = DDIMSampler(model).sample(conditioning=louder, **kw)
    assert samples.shape == (2, 4, LATENT, LATENT) and torch.isfinite(guided).all()
    assert not torch.allclose(samples, guided) and not torch.allclose(samples, other_level)
    assert model.decode_first_stage(samples).shape == (2, 3, SIZE, SIZE)

    log = model.log_images(batch, N=2, ddim_steps=4, plot_progressive_rows=False, unconditional_guidance_scale=2.0,
                           unconditional_guidance_label=[""])
    assert log["x_lr"].shape == (2, 3, LATENT, LATENT)
    rec_key = next(k for k in log if k.startswith("x_lr_rec_@noise_levels"))
    assert log[rec_key].shape == (2, 3, LATENT, LATENT)
    for key in ("inputs", "reconstruction", "conditioning", "samples", "samples_cfg_scale_2.00"):
        assert log[key].shape == (2, 3, SIZE, SIZE), key


RESCALER = {"target": "ldm.modules.encoders.modules.SpatialRescaler",
            "params": {"n_stages": 1, "method": "bilinear", "multiplier": 0.5, "in_channels": 3}}


@pytest.mark.parametrize("cond_stage,downscale_f", [({"target": "torch.nn.Identity"}, 4), (RESCALER, 2)],
                         ids=["identity", "spatial_rescaler"])
def test_concat_super_resolution_with_the_low_res_image_as_conditioning(cond_stage, downscale_f):
    """latent-diffusion's bsr_sr setup: LatentDiffusion with concat conditioning on the LR image, passed
    through (LR at the latent size) or brought to the latent size by a SpatialRescaler."""
    torch.manual_seed(0)
    cfg = model_config("ldm.models.diffusion.ddpm.LatentDiffusion", unet(7, text=False), cond_stage, "concat",
                       cond_key="LR_image")
    model = instantiate_from_config(cfg)
    assert type(model) is LatentDiffusion
    data = ShapesSR(size=SIZE, length=64, degradation="bsrgan", downscale_f=downscale_f)
    before = first_conv(model)
    train(model, data)
    assert not torch.equal(first_conv(model)[:, 4:], before[:, 4:])
    model.eval()
    batch = batch_of(data)
    z, c = model.get_input(batch, "image")
    lr = batch["LR_image"].permute(0, 3, 1, 2)
    expected = lr if downscale_f == 4 else torch.nn.functional.interpolate(lr, scale_factor=0.5, mode="bilinear")
    torch.testing.assert_close(c, expected)
    samples, _ = DDIMSampler(model).sample(4, 2, (4, LATENT, LATENT), c, verbose=False, seeds=[1, 2])
    flipped, _ = DDIMSampler(model).sample(4, 2, (4, LATENT, LATENT), -c, verbose=False, seeds=[1, 2])
    assert samples.shape == (2, 4, LATENT, LATENT) and not torch.allclose(samples, flipped)
    log = model.log_images(batch, N=2, ddim_steps=4, inpaint=False, plot_progressive_rows=False,
                           plot_diffusion_rows=False)
    assert torch.equal(log["conditioning"], lr) and log["samples"].shape == (2, 3, SIZE, SIZE)


def shrink(cfg, text_stage, **unet_extra):
    """The published config with a tiny UNet, a narrow first stage and a tiny text encoder."""
    p = cfg.model.params
    u = p.unet_config.params
    u.update(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2], context_dim=16,
             **unet_extra)
    if "num_head_channels" in u:
        u.num_head_channels = 16
    if "num_heads" in u:
        u.num_heads = 2
    p.first_stage_config.params.ddconfig.update(ch=32, resolution=SIZE)
    p.cond_stage_config = OmegaConf.create(text_stage)
    return cfg


def one_step(model, batch):
    """Loss and gradients of one step (the UNet's zero-initialised convs get random weights first)."""
    randomise_zero_convs(model)
    loss, _ = model.shared_step(batch)
    loss.backward()
    assert torch.isfinite(loss)
    return model.model.diffusion_model.input_blocks[0][0].weight.grad


def test_x4_upscaling_config_one_training_step(text_stage):
    torch.manual_seed(0)
    cfg = shrink(OmegaConf.load(CONFIGS / "x4-upscaling.yaml"), text_stage, disable_self_attentions=[True, False])
    cfg.model.params.image_size = LATENT
    model = instantiate_from_config(cfg.model)
    assert isinstance(model, LatentUpscaleDiffusion) and model.parameterization == "v"
    assert model.low_scale_model.max_noise_level == 350 and model.low_scale_key == "lr"
    assert model.state_dict()[FIRST_CONV].shape[1] == 7
    hr = torch.rand(2, SIZE, SIZE, 3) * 2 - 1
    batch = {"jpg": hr, "lr": hr[:, ::4, ::4], "txt": ["a red circle on a white background"] * 2}
    grad = one_step(model, batch)
    assert grad[:, 4:].abs().sum() > 0  # the low-res image reaches the UNet
    assert model.model.diffusion_model.label_emb.weight.grad.abs().sum() > 0  # and so does its noise level


def test_v2_inpainting_config_one_training_step(text_stage):
    torch.manual_seed(0)
    cfg = shrink(OmegaConf.load(CONFIGS / "v2-inpainting-inference.yaml"), text_stage)
    cfg.model.params.image_size = SIZE // 8
    model = instantiate_from_config(cfg.model)
    assert isinstance(model, LatentInpaintDiffusion) and model.state_dict()[FIRST_CONV].shape[1] == 9
    example = InpaintingDataset(ShapesTrain(size=SIZE, length=2))
    batch = next(iter(loader([{"jpg": e["image"], "mask": e["mask"], "masked_image": e["masked_image"],
                               "txt": e["caption"]} for e in (example[0], example[1])], 2)))
    grad = one_step(model, batch)
    assert grad[:, 4:].abs().sum() > 0  # mask and masked image reach the UNet
    assert model.finetune_keys[0] == FIRST_CONV


@pytest.mark.parametrize("make", [inpaint_config, upscale_config], ids=["inpainting", "upscaler"])
def test_task_log_images_draw_with_the_registry_sampler(text_stage, make, monkeypatch):
    from ldm.models.diffusion.sampler import Sampler

    torch.manual_seed(0)
    model = instantiate_from_config(make(text_stage)).eval()
    randomise_zero_convs(model)
    data = InpaintingDataset(ShapesTrain(size=SIZE, length=4), seed=1) if make is inpaint_config else \
        ShapesSR(size=SIZE, length=4, degradation="bsrgan_light", downscale_f=4)
    batch = batch_of(data)
    drawn = []
    run = Sampler.run
    monkeypatch.setattr(Sampler, "run",
                        lambda self, *a, **k: drawn.append((self.name, k["options"])) or run(self, *a, **k))
    kw = dict(N=2, ddim_steps=4, plot_progressive_rows=False, plot_diffusion_rows=False,
              unconditional_guidance_scale=2.0, unconditional_guidance_label=[""])
    torch.manual_seed(1)
    log = model.log_images(batch, sampler="euler_ancestral", **kw)
    assert drawn == [("euler_ancestral", {})] * 2  # samples and guided samples; ddim_eta is DDIM's only
    assert log["samples"].shape == (2, 3, SIZE, SIZE) and torch.isfinite(log["samples_cfg_scale_2.00"]).all()
    torch.manual_seed(1)
    ddim = model.log_images(batch, **kw)
    assert [name for name, _ in drawn[2:]] == ["ddim"] * 2 and not torch.equal(ddim["samples"], log["samples"])
    with pytest.raises(ValueError, match="needs ddim_steps"):
        model.log_images(batch, N=2, sampler="heun", ddim_steps=None)
