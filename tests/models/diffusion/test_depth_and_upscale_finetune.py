"""LatentDepth2ImageDiffusion (SD 2 depth-to-image, a real MiDaS network with random weights as the depth stage,
AddMiDaS preparing its input) and LatentUpscaleFinetuneDiffusion (low-resolution concat, reshuffle, noise
augmentation) on tiny configs; the published v2-midas-inference.yaml for one training step."""
from pathlib import Path

import einops
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm.data.shapes import ShapesTrain
from ldm.data.util import AddMiDaS
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddpm import LatentDepth2ImageDiffusion, LatentUpscaleFinetuneDiffusion
from ldm.models.diffusion.task_models import space_to_depth
from ldm.modules.midas.api import load_midas_transform
from ldm.util import instantiate_from_config
from tiny_ldm import LATENT, SIZE, batch_of, model_config, randomise_zero_convs, train
from tiny_ldm import unet as tiny_unet

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "stable-diffusion"
FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight"
SMALL_MIDAS = {"target": "ldm.modules.midas.api.MiDaSInference",
               "params": {"model_type": "midas_v21_small", "model_path": None}}


@pytest.fixture(scope="module")
def depth_data():
    """Shapes examples with `jpg` and its MiDaS input (midas_v21_small: 256 x 256, ImageNet-normalised)."""
    add = AddMiDaS("midas_v21_small")
    return [add({**example, "jpg": example["image"]}) for example in ShapesTrain(size=SIZE, length=8)]


def depth_config(text_stage, **extra):
    return model_config("ldm.models.diffusion.ddpm.LatentDepth2ImageDiffusion", tiny_unet(5), text_stage, "hybrid",
                        depth_stage_config=SMALL_MIDAS, finetune_keys=None, **extra)


def test_add_midas_prepares_the_depth_input(depth_data):
    example = depth_data[0]
    midas_in = example["midas_in"]
    assert midas_in.shape == (3, 256, 256) and midas_in.dtype == "float32"  # upscaled to the network's 256
    # the [-1, 1] image in [0, 1], through MiDaS' transform (bicubic resize, ImageNet normalisation, CHW)
    direct = load_midas_transform("midas_v21_small")({"image": (example["jpg"] + 1) / 2})["image"]
    assert (midas_in == direct).all()
    assert midas_in.min() < -1.5 and midas_in.max() > 1.5  # normalised, not [0, 1]
    with pytest.raises(KeyError, match="no 'jpg' image"):
        AddMiDaS("midas_v21_small")({"image": example["image"]})


def test_depth2img_conditions_on_normalised_depth_and_trains(text_stage, depth_data):
    torch.manual_seed(0)
    model = instantiate_from_config(depth_config(text_stage))
    assert isinstance(model, LatentDepth2ImageDiffusion) and model.depth_stage_key == "midas_in"
    assert any(k.startswith("depth_model.model.") for k in model.state_dict())
    assert not {id(p) for p in model.trainable_parameters()} & {id(p) for p in model.depth_model.parameters()}
    before = model.state_dict()[FIRST_CONV].clone()
    train(model, depth_data, steps=3, batch_size=2)
    assert not torch.equal(model.state_dict()[FIRST_CONV][:, 4:], before[:, 4:])  # the depth channel trains
    assert not model.depth_model.training

    model.eval()
    batch = batch_of(depth_data, 2)
    z, cond = model.get_input(batch, "image")
    c_cat = cond["c_concat"][0]
    assert c_cat.shape == (2, 1, LATENT, LATENT) and set(cond) == {"c_concat", "c_crossattn"}
    with torch.no_grad():
        raw = model.depth_model.model(batch["midas_in"]).unsqueeze(1)
        raw = F.interpolate(F.interpolate(raw, size=(256, 256), mode="bicubic", align_corners=False),
                            size=(LATENT, LATENT), mode="bicubic", align_corners=False)
    lo, hi = raw.amin(dim=(1, 2, 3), keepdim=True), raw.amax(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(c_cat, 2 * (raw - lo) / (hi - lo + 0.001) - 1, rtol=1e-5, atol=1e-5)
    assert c_cat.amin() == pytest.approx(-1.0) and c_cat.amax() < 1.0
    samples, _ = DDIMSampler(model).sample(S=4, batch_size=2, shape=(4, LATENT, LATENT), conditioning=cond,
                                           verbose=False, seeds=[1, 2])
    flipped = {**cond, "c_concat": [-c_cat]}
    other, _ = DDIMSampler(model).sample(S=4, batch_size=2, shape=(4, LATENT, LATENT), conditioning=flipped,
                                         verbose=False, seeds=[1, 2])
    assert not torch.allclose(samples, other)  # the depth steers the samples
    log = model.log_images(batch, N=2, ddim_steps=4, plot_progressive_rows=False, plot_diffusion_rows=False)
    assert log["depth"].shape == (2, 1, 256, 256) and log["depth"].amin() == -1 and log["depth"].amax() == 1
    assert log["samples"].shape == (2, 3, SIZE, SIZE)


def test_depth2img_checkpoint_restores_the_depth_stage(text_stage, tmp_path):
    torch.manual_seed(0)
    model = instantiate_from_config(depth_config(text_stage))
    with torch.no_grad():
        next(model.depth_model.parameters()).add_(1.0)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "depth.ckpt")
    restored = instantiate_from_config(depth_config(text_stage, ckpt_path=str(tmp_path / "depth.ckpt")))
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    with pytest.raises(ValueError, match="concat_keys must name one key"):
        instantiate_from_config(depth_config(text_stage, concat_keys=["midas_in", "mask"]))


def test_v2_midas_config_one_training_step(text_stage, depth_data):
    """The published config with a tiny UNet / first stage / text stage and the small MiDaS as depth stage."""
    torch.manual_seed(0)
    cfg = OmegaConf.load(CONFIGS / "v2-midas-inference.yaml").model
    assert cfg.params.depth_stage_config.params.model_type == "dpt_hybrid" and cfg.params.finetune_keys is None
    u = cfg.params.unet_config.params
    u.update(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2], context_dim=16,
             num_head_channels=16)
    cfg.params.first_stage_config.params.ddconfig.update(ch=32, resolution=SIZE)
    cfg.params.cond_stage_config = OmegaConf.create(text_stage)
    cfg.params.depth_stage_config = OmegaConf.create(SMALL_MIDAS)
    cfg.params.image_size = SIZE // 8
    model = instantiate_from_config(cfg)
    assert isinstance(model, LatentDepth2ImageDiffusion) and model.state_dict()[FIRST_CONV].shape[1] == 5
    batch = batch_of([{"jpg": e["image"], "txt": e["caption"], "midas_in": e["midas_in"]} for e in depth_data[:2]], 2)
    randomise_zero_convs(model)
    loss, _ = model.shared_step(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.model.diffusion_model.input_blocks[0][0].weight.grad[:, 4:].abs().sum() > 0


# ---------------------------------------------------------------- LatentUpscaleFinetuneDiffusion


def test_space_to_depth_is_the_original_rearrange():
    x = torch.randn(2, 3, 8, 12)
    expected = einops.rearrange(x, "b c (p1 h) (p2 w) -> b (p1 p2 c) h w", p1=2, p2=2)
    assert torch.equal(space_to_depth(x, 2), expected)
    with pytest.raises(ValueError, match="does not divide"):
        space_to_depth(torch.randn(1, 3, 9, 9), 2)


def upscale_ft_config(text_stage, with_noise=True, **extra):
    low_scale = {"target": "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation",
                 "params": {"noise_schedule_config": {"linear_start": 1e-4, "linear_end": 2e-2},
                            "max_noise_level": 350}}
    if with_noise:
        extra.setdefault("low_scale_config", low_scale)
        extra.setdefault("low_scale_key", "lr")
    extra.setdefault("reshuffle_patch_size", 2)
    unet = tiny_unet(4 + 12, num_classes=1000 if with_noise else None)
    return model_config("ldm.models.diffusion.ddpm.LatentUpscaleFinetuneDiffusion", unet, text_stage,
                        "hybrid-adm" if with_noise else "hybrid", finetune_keys=None, **extra)


@pytest.fixture(scope="module")
def sr_data():
    """Shapes at 32 px with their 16 px versions as `lr` (reshuffled 2x2: 12 channels at the 8 x 8 latent)."""
    def low(image):
        return F.avg_pool2d(torch.as_tensor(image).permute(2, 0, 1)[None], 2)[0].permute(1, 2, 0)

    return [{**e, "lr": low(e["image"])} for e in ShapesTrain(size=SIZE, length=8)]


@pytest.mark.parametrize("with_noise", [True, False], ids=["noise_augmented", "plain"])
def test_upscale_finetune_concatenates_the_reshuffled_low_res_image(text_stage, sr_data, with_noise):
    torch.manual_seed(0)
    model = instantiate_from_config(upscale_ft_config(text_stage, with_noise))
    assert isinstance(model, LatentUpscaleFinetuneDiffusion)
    randomise_zero_convs(model)
    before = model.state_dict()[FIRST_CONV].clone()
    train(model, sr_data, steps=2, batch_size=2)
    assert not torch.equal(model.state_dict()[FIRST_CONV][:, 4:], before[:, 4:])
    model.eval()
    batch = batch_of(sr_data, 2)
    _, cond = model.get_input(batch, "image")
    reshuffled = space_to_depth(batch["lr"].permute(0, 3, 1, 2), 2)
    if with_noise:
        assert set(cond) == {"c_concat", "c_crossattn", "c_adm"} and cond["c_adm"].max() < 350
        assert cond["c_concat"][0].shape == reshuffled.shape and not torch.allclose(cond["c_concat"][0], reshuffled)
    else:
        assert set(cond) == {"c_concat", "c_crossattn"}
        assert torch.equal(cond["c_concat"][0], reshuffled)
    log = model.log_images(batch, N=2, ddim_steps=4, plot_progressive_rows=False, plot_diffusion_rows=False)
    assert log["lr"].shape == (2, 3, 16, 16) and log["samples"].shape == (2, 3, SIZE, SIZE)


def test_upscale_finetune_errors(text_stage, sr_data):
    model = instantiate_from_config(upscale_ft_config(text_stage, with_noise=False, reshuffle_patch_size=None))
    with pytest.raises(ValueError, match=r"concat_keys 'lr': \(16, 16\) images .* do not match the latent size"):
        model.get_input(batch_of(sr_data, 2), "image")
    with pytest.raises(ValueError, match="low_scale_config needs low_scale_key"):
        instantiate_from_config(upscale_ft_config(text_stage, low_scale_key="LR"))
