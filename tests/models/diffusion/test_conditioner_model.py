"""LatentDiffusion with a GeneralConditioner cond stage: a new conditioning input (a toy embedder on a new batch
key) added by config alone trains and reaches the UNet; the roles default from the embedders; guidance takes the
conditioner's null; checkpoints keep cond_stage_model.embedders.* keys."""
import pytorch_lightning as pl
import pytest
import torch
from omegaconf import OmegaConf

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.encoders.conditioner import GeneralConditioner
from ldm.util import ConfigError, instantiate_from_config

N_CLASSES = 5


def first_stage():
    ddconfig = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    return {"target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {"embed_dim": 4, "ddconfig": ddconfig, "lossconfig": {"target": "torch.nn.Identity"}}}


def embedders(**size_spec):
    """A class label as cross-attention context, and a new input 'size' ([B, 2]) as the UNet's vector."""
    return [
        {"target": "ldm.modules.encoders.modules.ClassEmbedder", "input_key": "class_label", "is_trainable": True,
         "ucg_rate": 0.2, "legacy_ucg_value": N_CLASSES - 1,
         "params": {"embed_dim": 16, "n_classes": N_CLASSES, "ucg_rate": 0.0}},
        {"target": "torch.nn.Linear", "input_key": "size", "is_trainable": True, "ucg_rate": 0.1,
         "params": {"in_features": 2, "out_features": 8}, **size_spec},
    ]


def ldm_config(emb_models=None, **extra):
    unet = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1],
                num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16, use_spatial_transformer=True,
                context_dim=16, num_classes="sequential", adm_in_channels=8)
    params = dict(linear_start=0.0015, linear_end=0.0195, timesteps=100, first_stage_key="image", image_size=8,
                  channels=4, monitor=None, conditioning_key=["crossattn", "vector"], scale_factor=1.0,
                  unet_config={"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
                  first_stage_config=first_stage(),
                  cond_stage_config={"target": "ldm.modules.encoders.conditioner.GeneralConditioner",
                                     "params": {"emb_models": emb_models or embedders(), "seed": 0}})
    params.update(extra)
    return OmegaConf.create({"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params})


class SizedColors(torch.utils.data.Dataset):
    """16x16 images of a colour, with a class label and a new conditioning input: the 'size' pair."""

    def __len__(self):
        return 32

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed(i)
        return {"image": torch.rand(16, 16, 3, generator=gen) * 2 - 1, "class_label": i % (N_CLASSES - 1),
                "size": torch.tensor([float(i % 3), float(i % 2)])}


def batch_of(n=4):
    return next(iter(torch.utils.data.DataLoader(SizedColors(), batch_size=n)))


def randomise_zero_convs(model):
    """The UNet's zero-initialised convs would hide every input from the output at initialisation."""
    with torch.no_grad():
        for p in model.model.diffusion_model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.05)


def test_a_new_conditioning_input_by_config_alone_trains_and_reaches_the_unet():
    torch.manual_seed(0)
    model = instantiate_from_config(ldm_config())
    assert isinstance(model.cond_stage_model, GeneralConditioner) and model.cond_stage_trainable
    assert model.model.conditioning_key == ("crossattn", "vector")
    assert {"cond_stage_model.embedders.0.embedding.weight", "cond_stage_model.embedders.1.weight"} <= set(
        model.state_dict())
    randomise_zero_convs(model)
    linear = model.cond_stage_model.embedders[1]
    before = linear.weight.detach().clone()
    model.learning_rate = 1e-2
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, torch.utils.data.DataLoader(SizedColors(), batch_size=4))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert not torch.equal(linear.weight, before)  # the new embedder was optimised with the model

    model.eval()
    batch = batch_of()
    z, c = model.get_input(batch, "image", force_c_encode=True)
    assert set(c) == {"crossattn", "vector"} and c["vector"].shape == (4, 8)
    x, t = torch.randn_like(z), torch.tensor([10, 20, 30, 40])
    other = {**batch, "size": batch["size"] + 1.0}
    out, out_other = model.apply_model(x, t, c), model.apply_model(x, t, model.get_conditioning(other))
    assert not torch.allclose(out, out_other)  # the new key reaches the UNet through its vector
    torch.testing.assert_close(model.apply_model(x, t, model.get_conditioning(batch)), out)


def test_frozen_conditioner_gives_the_role_dict_from_get_input_and_trains_only_the_unet():
    torch.manual_seed(0)
    frozen = [dict(e, is_trainable=False) for e in embedders()]
    model = instantiate_from_config(ldm_config(frozen))
    assert not model.cond_stage_trainable
    z, c = model.get_input(batch_of(), "image")
    assert set(c) == {"crossattn", "vector"} and not c["vector"].requires_grad
    model.learning_rate = 1e-3
    optimised = {id(p) for group in model.configure_optimizers().param_groups for p in group["params"]}
    assert not any(id(p) in optimised for p in model.cond_stage_model.parameters())
    trainable = instantiate_from_config(ldm_config())
    z, raw = trainable.get_input(batch_of(), "image")  # encoded in forward, with gradients
    assert set(raw) >= {"class_label", "size"}


def test_roles_default_from_the_embedders_and_config_errors_name_the_key():
    named = embedders(role="vector")
    named[0]["role"] = "crossattn"
    model = instantiate_from_config(ldm_config(named, conditioning_key=None))
    assert model.model.conditioning_key == ("crossattn", "vector")
    with pytest.raises(ConfigError, match="model.params.conditioning_key: name the roles"):
        instantiate_from_config(ldm_config(conditioning_key=None))
    with pytest.raises(ConfigError, match="cond_stage_trainable: a GeneralConditioner cond stage trains"):
        instantiate_from_config(ldm_config(cond_stage_trainable=True))
    with pytest.raises(ConfigError, match="num_timesteps_cond"):
        instantiate_from_config(ldm_config(num_timesteps_cond=2))


def test_guidance_takes_the_conditioners_null_and_log_images_guides():
    torch.manual_seed(0)
    model = instantiate_from_config(ldm_config()).eval()
    randomise_zero_convs(model)
    batch = batch_of(2)
    c = model.get_conditioning(batch)
    uc = model.guidance_unconditional(c, 2, inputs=batch)
    null = model.cond_stage_model.embedders[0].embedding.weight[-1]
    torch.testing.assert_close(uc["crossattn"][:, 0], null.expand(2, -1))  # the class embedder's null input
    assert not uc["vector"].any()  # the size embedder drops to zero
    kw = dict(S=5, batch_size=2, shape=(4, 8, 8), verbose=False, seeds=[1, 2])
    plain, _ = DDIMSampler(model).sample(conditioning=c, **kw)
    guided, _ = DDIMSampler(model).sample(conditioning=c, unconditional_guidance_scale=3.0,
                                          unconditional_conditioning=uc, **kw)
    assert torch.isfinite(guided).all() and not torch.allclose(plain, guided)
    logs = model.log_images(batch, N=2, ddim_steps=5, unconditional_guidance_scale=2.0, plot_progressive_rows=False,
                            inpaint=False)
    assert logs["samples_cfg_scale_2.00"].shape == (2, 3, 16, 16)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = instantiate_from_config(ldm_config()).eval()
    randomise_zero_convs(model)
    path = tmp_path / "cond.ckpt"
    torch.save({"state_dict": model.state_dict()}, path)
    reloaded = instantiate_from_config(ldm_config(ckpt_path=str(path))).eval()
    batch = batch_of(2)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 50])
    assert torch.equal(reloaded.apply_model(x, t, reloaded.get_conditioning(batch)),
                       model.apply_model(x, t, model.get_conditioning(batch)))


@pytest.fixture(scope="module")
def tiny_text_encoders(tmp_path_factory):
    """A tiny random CLIP text model folder (with the real CLIP tokenizer) and a tiny open_clip text arch, both
    32 wide, standing in for CLIP ViT-L/14 and OpenCLIP ViT-H/14."""
    import json

    import open_clip
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.modules.encoders.modules import write_clip_tokenizer

    root = tmp_path_factory.mktemp("encoders")
    clip = write_clip_tokenizer(root / "clip")
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=2, max_position_embeddings=77)).save_pretrained(clip)
    arch = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                            "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "layers": 2, "width": 32, "heads": 2}}
    (root / "ldm-test-sdxl-style.json").write_text(json.dumps(arch))
    open_clip.add_model_config(root / "ldm-test-sdxl-style.json")
    return str(clip), "ldm-test-sdxl-style"


def test_the_sdxl_style_config_is_one_conditioner_config(tiny_text_encoders):
    """configs/latent-diffusion/txt2img-sdxl-style-conditioner.yaml with tiny encoders and UNet: two text
    encoders joined into one context, CLIP's pooled embedding as the vector, one training step, guidance."""
    from pathlib import Path

    clip, arch = tiny_text_encoders
    cfg = OmegaConf.load(Path(__file__).resolve().parents[3] / "configs/latent-diffusion/"
                         "txt2img-sdxl-style-conditioner.yaml")
    p = cfg.model.params
    p.cond_stage_config.params.emb_models[0].params.version = clip
    p.cond_stage_config.params.emb_models[1].params.update(arch=arch, version=None)
    p.unet_config.params.update(model_channels=32, channel_mult=[1, 2], attention_resolutions=[2],
                                num_res_blocks=1, num_head_channels=16, context_dim=64, adm_in_channels=32,
                                use_checkpoint=False)
    p.first_stage_config = OmegaConf.create(first_stage())
    p.update(image_size=8, first_stage_key="image")
    torch.manual_seed(0)
    model = instantiate_from_config(cfg.model)
    captions = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
    batch = {"image": torch.rand(4, 16, 16, 3) * 2 - 1, "txt": captions}
    c = model.get_conditioning(batch)
    clip_z, pooled = model.cond_stage_model.embedders[0](captions)
    assert c["crossattn"].shape == (4, 77, 64) and c["vector"].shape == (4, 32)
    torch.testing.assert_close(c["crossattn"][..., :32], clip_z)  # CLIP first, OpenCLIP next, along the features
    torch.testing.assert_close(c["crossattn"][..., 32:], model.cond_stage_model.embedders[1](captions))
    torch.testing.assert_close(c["vector"], pooled)
    uc = model.guidance_unconditional(c, 4, inputs=batch)
    assert not uc["crossattn"].any() and not uc["vector"].any()  # both encoders were trained to drop to zeros
    model.train()
    loss, _ = model.shared_step(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.model.diffusion_model.label_emb[0][0].weight.grad is not None
