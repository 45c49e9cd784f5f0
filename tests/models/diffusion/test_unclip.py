"""ImageEmbeddingConditionedLatentDiffusion (SD 2.1 unCLIP) on a tiny config: a tiny open_clip vision tower as the
frozen image embedder, the Karlo-schedule noise augmentation, text by cross-attention and the image embedding as
the UNet's vector; training, the original's random stream for augmentation and embedding dropout, sampling with
guidance, log_images and checkpoint loading."""
import json

import open_clip
import pytest
import torch

from ldm.data.shapes import ShapesTrain
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddpm import ImageEmbeddingConditionedLatentDiffusion
from ldm.models.diffusion.sampler import Sampler
from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.util import ConfigError, instantiate_from_config
from tiny_ldm import batch_of, model_config, randomise_zero_convs, train
from tiny_ldm import unet as tiny_unet

ARCH = "ldm-test-unclip-tiny"
EMBED, LEVEL_DIM = 16, 16


@pytest.fixture(scope="module", autouse=True)
def tiny_arch(tmp_path_factory):
    cfg = {"embed_dim": EMBED, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                              "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path_factory.mktemp("arch") / f"{ARCH}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)


def unclip_config(text_stage, **extra):
    embedder = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPImageEmbedder",
                "params": {"arch": ARCH, "version": None}}
    noise_aug = {"target": "ldm.modules.encoders.modules.CLIPEmbeddingNoiseAugmentation",
                 "params": {"timestep_dim": LEVEL_DIM,
                            "noise_schedule_config": {"timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}}}
    unet = tiny_unet(4, num_classes="sequential", adm_in_channels=EMBED + LEVEL_DIM)
    params = dict(embedder_config=embedder, noise_aug_config=noise_aug, embedding_key="image", embedding_dropout=0.25,
                  parameterization="v", use_ema=False)
    params.update(extra)
    return model_config("ldm.models.diffusion.ddpm.ImageEmbeddingConditionedLatentDiffusion", unet, text_stage,
                             "crossattn-adm", **params)


@pytest.fixture(scope="module")
def data():
    return ShapesTrain(size=32, length=64)


def test_unclip_trains_with_the_image_embedding_as_the_vector(text_stage, data):
    torch.manual_seed(0)
    model = instantiate_from_config(unclip_config(text_stage))
    assert isinstance(model, ImageEmbeddingConditionedLatentDiffusion)
    keys = set(model.state_dict())
    assert "embedder.model.visual.conv1.weight" in keys and "noise_augmentor.betas" in keys
    assert not any(k.startswith("noise_augmentor.data_") for k in keys)  # the statistics are not state
    trainable = {id(p) for p in model.trainable_parameters()}
    assert not trainable & {id(p) for p in model.embedder.parameters()}
    randomise_zero_convs(model)
    label_before = model.model.diffusion_model.label_emb[0][0].weight.detach().clone()
    train(model, data)
    assert not torch.equal(model.model.diffusion_model.label_emb[0][0].weight, label_before)  # the vector trains
    assert not model.embedder.training and not any(p.requires_grad for p in model.embedder.parameters())

    model.eval()
    batch = batch_of(data, 3)
    z, cond = model.get_input(batch, "image")
    assert set(cond) == {"c_crossattn", "c_adm"} and cond["c_adm"].shape == (3, EMBED + LEVEL_DIM)
    assert cond["c_adm"].abs().sum(1).min() > 0  # no embedding dropout outside training
    # the embedding at a given level: the augmented image embedding joined with the level's sinusoidal embedding
    images = batch["image"].permute(0, 3, 1, 2)
    at_zero = model.image_embedding(images, noise_level=0)
    torch.testing.assert_close(at_zero[:, :EMBED], model.embedder(images), atol=0.05, rtol=0)
    torch.testing.assert_close(at_zero[:, EMBED:], timestep_embedding(torch.zeros(3, dtype=torch.long), LEVEL_DIM))


def test_augmentation_and_dropout_follow_the_original_random_stream(text_stage, data):
    """In training the original drew, in this order: the noise level (randint), the augmentation noise (randn_like),
    then the keep mask (bernoulli on the model's device)."""
    torch.manual_seed(0)
    model = instantiate_from_config(unclip_config(text_stage, embedding_dropout=0.5)).train()
    batch = batch_of(data, 8)
    images = batch["image"].permute(0, 3, 1, 2)
    torch.manual_seed(11)
    roles = model.task_roles(batch, (8, 8))
    torch.manual_seed(11)
    with torch.no_grad():
        emb = model.embedder(images)
        aug = model.noise_augmentor
        levels = torch.randint(0, aug.max_noise_level, (8,))
        noise = torch.randn_like(emb)
        a = aug.alphas_cumprod[levels][:, None]
        noised = (a.sqrt() * aug.scale(emb) + (1 - a).sqrt() * noise) * aug.data_std + aug.data_mean
        keep = torch.bernoulli(0.5 * torch.ones(8))
    expected = keep[:, None] * torch.cat([noised, timestep_embedding(levels, LEVEL_DIM)], 1)
    torch.testing.assert_close(roles["vector"], expected, rtol=1e-5, atol=1e-6)
    assert 0 < keep.sum() < 8  # some dropped, some kept: the comparison sees both
    shares = []
    for seed in range(30):
        torch.manual_seed(seed)
        shares.append((model.task_roles(batch, (8, 8))["vector"].abs().sum(1) == 0).float().mean())
    assert 0.35 < torch.stack(shares).mean() < 0.65


def test_unclip_samples_with_guidance_and_logs(text_stage, data, monkeypatch):
    torch.manual_seed(0)
    model = instantiate_from_config(unclip_config(text_stage)).eval()
    randomise_zero_convs(model)
    batch = batch_of(data, 2)
    _, cond = model.get_input(batch, "image")
    uc = model.guidance_unconditional(cond, 2, "")
    assert torch.equal(uc["c_adm"], cond["c_adm"]) and not torch.equal(uc["c_crossattn"][0], cond["c_crossattn"][0])
    kw = dict(S=4, batch_size=2, shape=(4, 8, 8), verbose=False, seeds=[1, 2])
    plain, _ = DDIMSampler(model).sample(conditioning=cond, **kw)
    other_image = {**cond, "c_adm": torch.flip(cond["c_adm"], [0])}
    swapped, _ = DDIMSampler(model).sample(conditioning=other_image, **kw)
    assert not torch.allclose(plain, swapped)  # the image embedding steers the samples
    log = model.log_images(batch, N=2, ddim_steps=4, unconditional_guidance_scale=3.0)
    assert set(log) == {"inputs", "reconstruction", "conditioning", "samplescfg_scale_3.00"}
    assert log["samplescfg_scale_3.00"].shape == (2, 3, 32, 32)
    drawn = []
    run = Sampler.run
    monkeypatch.setattr(Sampler, "run", lambda self, *a, **k: drawn.append(self.name) or run(self, *a, **k))
    heun = model.log_images(batch, N=2, ddim_steps=4, unconditional_guidance_scale=3.0, sampler="heun")
    assert drawn == ["heun"] and not torch.equal(heun["samplescfg_scale_3.00"], log["samplescfg_scale_3.00"])


def test_unclip_checkpoint_restores_the_embedder_too(text_stage, tmp_path):
    torch.manual_seed(0)
    model = instantiate_from_config(unclip_config(text_stage))
    with torch.no_grad():
        model.embedder.model.visual.conv1.weight.add_(1.0)
    path = tmp_path / "unclip.ckpt"
    torch.save({"state_dict": model.state_dict()}, path)
    restored = instantiate_from_config(unclip_config(text_stage, ckpt_path=str(path)))
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_unclip_parameter_errors(text_stage):
    with pytest.raises(ConfigError, match="freeze_embedder: false is not supported"):
        instantiate_from_config(unclip_config(text_stage, freeze_embedder=False))
    with pytest.raises(ConfigError, match=r"embedding_dropout must lie in \[0, 1\]"):
        instantiate_from_config(unclip_config(text_stage, embedding_dropout=1.5))


@pytest.mark.parametrize("variant", ["h", "l"])
def test_published_unclip_configs_one_training_step(text_stage, data, variant, tmp_path):
    """v2-1-stable-unclip-{h,l}-inference.yaml with tiny towers: the H config's open_clip image tower, the L
    config's OpenAI CLIP (random weights) and its embedding statistics file; one step reaches the vector input."""
    from pathlib import Path

    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[3] / "configs" / "stable-diffusion"
                         / f"v2-1-stable-unclip-{variant}-inference.yaml").model
    p = cfg.params
    assert p.conditioning_key == "crossattn-adm" and p.parameterization == "v" and p.embedding_dropout == 0.25
    assert p.unet_config.params.adm_in_channels == 2 * p.noise_aug_config.params.timestep_dim
    if variant == "h":
        assert p.embedder_config.target.endswith("FrozenOpenCLIPImageEmbedder")
        p.embedder_config.params = {"arch": ARCH, "version": None}
    else:
        assert p.embedder_config.params.model == "ViT-L/14"
        assert p.noise_aug_config.params.clip_stats_path == "checkpoints/karlo_models/ViT-L-14_stats.th"
        p.embedder_config.params = {"model": ARCH, "pretrained": False}
        torch.save((torch.randn(EMBED), torch.rand(EMBED) + 0.5), tmp_path / "stats.th")
        p.noise_aug_config.params.clip_stats_path = str(tmp_path / "stats.th")
    p.noise_aug_config.params.timestep_dim = LEVEL_DIM
    p.unet_config.params.update(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2],
                                context_dim=16, num_head_channels=16, adm_in_channels=EMBED + LEVEL_DIM)
    p.first_stage_config.params.ddconfig.update(ch=32, resolution=32)
    p.cond_stage_config = OmegaConf.create(text_stage)
    p.image_size = 4
    torch.manual_seed(0)
    model = instantiate_from_config(cfg)
    assert isinstance(model, ImageEmbeddingConditionedLatentDiffusion)
    batch = batch_of([{"jpg": e["image"], "txt": e["caption"]} for e in (data[0], data[1])], 2)
    randomise_zero_convs(model)
    loss, _ = model.shared_step(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.model.diffusion_model.label_emb[0][0].weight.grad.abs().sum() > 0
