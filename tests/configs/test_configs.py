"""The shipped YAML configs: they load, their networks build, and the state_dict keys and shapes
are exactly those of the published checkpoints.

The expected keys are enumerated here from the architecture hyper-parameters alone (channel_mult,
num_res_blocks, attention_resolutions, ...), independently of the implementation; a few published
numbers (SD v1 UNet: 686 tensors, 859,520,964 parameters; SD KL-f8 VAE: 248 tensors) anchor the
enumeration itself. Everything is built on the meta device, so even the 1.4B models cost nothing.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"

EXPECTED_CONFIGS = {
    "stable-diffusion/v1-inference.yaml",
    "stable-diffusion/v2-inference.yaml",
    "stable-diffusion/v2-inference-v.yaml",
    "stable-diffusion/v2-inpainting-inference.yaml",
    "stable-diffusion/x4-upscaling.yaml",
    "latent-diffusion/cin-ldm-vq-f8.yaml",
    "latent-diffusion/lsun_churches-ldm-kl-8.yaml",
    "latent-diffusion/celebahq-ldm-vq-4.yaml",
    "latent-diffusion/txt2img-1p4B-eval.yaml",
    "autoencoder/autoencoder_kl_8x8x64.yaml",
    "autoencoder/autoencoder_kl_16x16x16.yaml",
    "autoencoder/autoencoder_kl_32x32x4.yaml",
    "autoencoder/autoencoder_kl_64x64x3.yaml",
    "first_stage_models/kl-f4.yaml",
    "first_stage_models/kl-f8.yaml",
    "first_stage_models/kl-f16.yaml",
    "first_stage_models/kl-f32.yaml",
    "first_stage_models/vq-f4.yaml",
    "first_stage_models/vq-f8.yaml",
    "first_stage_models/vq-f16.yaml",
}
# karlo/* hold Karlo's own keys and no targets (tests/configs/test_published_configs.py checks them as data)
ALL_CONFIGS = sorted(p.relative_to(CONFIG_ROOT).as_posix() for p in CONFIG_ROOT.rglob("*.yaml")
                     if p.relative_to(CONFIG_ROOT).parts[0] != "karlo")

# model.target and, for diffusion models, the first/cond stage targets as published.
LDM = "ldm.models.diffusion.ddpm.LatentDiffusion"
KL, VQ_INTERFACE, VQ = (
    "ldm.models.autoencoder.AutoencoderKL",
    "ldm.models.autoencoder.VQModelInterface",
    "ldm.models.autoencoder.VQModel",
)
IDENTITY = "ldm.models.autoencoder.IdentityFirstStage"
ENC = "ldm.modules.encoders.modules."
EXPECTED_TARGETS = {
    "stable-diffusion/v1-inference.yaml": (LDM, KL, ENC + "FrozenCLIPEmbedder"),
    "stable-diffusion/v2-inference.yaml": (LDM, KL, ENC + "FrozenOpenCLIPEmbedder"),
    "stable-diffusion/v2-inference-v.yaml": (LDM, KL, ENC + "FrozenOpenCLIPEmbedder"),
    "stable-diffusion/v2-inpainting-inference.yaml": (
        "ldm.models.diffusion.ddpm.LatentInpaintDiffusion", KL, ENC + "FrozenOpenCLIPEmbedder"),
    "stable-diffusion/x4-upscaling.yaml": (
        "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion", KL, ENC + "FrozenOpenCLIPEmbedder"),
    "latent-diffusion/cin-ldm-vq-f8.yaml": (LDM, VQ_INTERFACE, ENC + "ClassEmbedder"),
    "latent-diffusion/lsun_churches-ldm-kl-8.yaml": (LDM, KL, "__is_unconditional__"),
    "latent-diffusion/celebahq-ldm-vq-4.yaml": (LDM, VQ_INTERFACE, "__is_unconditional__"),
    "latent-diffusion/txt2img-1p4B-eval.yaml": (LDM, KL, ENC + "BERTEmbedder"),
}
UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"


def load(name: str):
    return OmegaConf.load(CONFIG_ROOT / name)


def is_diffusion(cfg) -> bool:
    return "unet_config" in cfg.model.params


def is_pixel_space(cfg) -> bool:
    """A diffusion model without an autoencoder (IdentityFirstStage, the paper's LDM-1)."""
    return is_diffusion(cfg) and cfg.model.params.first_stage_config.target == IDENTITY


def first_stage(cfg):
    """(params of the autoencoder, is_vq) for a diffusion config's first stage or an autoencoder config."""
    if is_diffusion(cfg):
        stage = cfg.model.params.first_stage_config
        return stage.params, stage.target != KL
    return cfg.model.params, cfg.model.target != KL


def shapes(module: torch.nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Expected state_dict layouts, written from the published architecture descriptions.
# ---------------------------------------------------------------------------------------------
def _norm(prefix: str, c: int) -> dict:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


def _layer(prefix: str, weight: tuple[int, ...]) -> dict:
    """A conv or linear layer with bias: weight [out, in, *kernel], bias [out]."""
    return {f"{prefix}.weight": weight, f"{prefix}.bias": weight[:1]}


def _conv(prefix: str, c_in: int, c_out: int, k: int) -> dict:
    return _layer(prefix, (c_out, c_in, k, k))


def unet_resblock(p: str, c_in: int, c_out: int, emb: int, scale_shift: bool) -> dict:
    keys = {**_norm(f"{p}.in_layers.0", c_in), **_conv(f"{p}.in_layers.2", c_in, c_out, 3)}
    keys |= _layer(f"{p}.emb_layers.1", ((2 if scale_shift else 1) * c_out, emb))
    keys |= {**_norm(f"{p}.out_layers.0", c_out), **_conv(f"{p}.out_layers.3", c_out, c_out, 3)}
    if c_in != c_out:
        keys |= _conv(f"{p}.skip_connection", c_in, c_out, 1)
    return keys


def unet_attention(p: str, ch: int, u, no_self_attn: bool) -> dict:
    """SpatialTransformer (heads * dim_head == ch for every published config) or ADM AttentionBlock.

    With `no_self_attn` the first attention of each transformer block attends to the context too.
    """
    if not u.get("use_spatial_transformer", False):
        return {**_norm(f"{p}.norm", ch), **_layer(f"{p}.qkv", (3 * ch, ch, 1)), **_layer(f"{p}.proj_out", (ch, ch, 1))}
    ctx = u.context_dim
    proj = (ch, ch) if u.get("use_linear_in_transformer", False) else (ch, ch, 1, 1)
    keys = {**_norm(f"{p}.norm", ch), **_layer(f"{p}.proj_in", proj), **_layer(f"{p}.proj_out", proj)}
    self_ctx = ctx if no_self_attn else ch
    for d in range(u.get("transformer_depth", 1)):
        b = f"{p}.transformer_blocks.{d}"
        for attn, kv_dim in (("attn1", self_ctx), ("attn2", ctx)):
            keys[f"{b}.{attn}.to_q.weight"] = (ch, ch)
            keys[f"{b}.{attn}.to_k.weight"] = (ch, kv_dim)
            keys[f"{b}.{attn}.to_v.weight"] = (ch, kv_dim)
            keys |= _layer(f"{b}.{attn}.to_out.0", (ch, ch))
        keys |= {**_layer(f"{b}.ff.net.0.proj", (8 * ch, ch)), **_layer(f"{b}.ff.net.2", (ch, 4 * ch))}
        for n in (1, 2, 3):
            keys |= _norm(f"{b}.norm{n}", ch)
    return keys


def expected_unet(u) -> dict[str, tuple[int, ...]]:
    """UNetModel keys level by level: input blocks (res [+attn], downsample), middle, output blocks."""
    mc, nrb, mults = u.model_channels, u.num_res_blocks, list(u.channel_mult)
    emb, ss, updown = 4 * mc, u.get("use_scale_shift_norm", False), u.get("resblock_updown", False)
    disabled = list(u.get("disable_self_attentions") or [False] * len(mults))

    def attn(p: str, ch: int, level: int | None) -> dict:
        off = u.get("disable_middle_self_attn", False) if level is None else disabled[level]
        return unet_attention(p, ch, u, off)

    def resample(p: str, ch: int, conv_name: str) -> dict:
        """Down/upsampling: a ResBlock with resblock_updown, else a 3x3 conv (`op` down, `conv` up)."""
        return unet_resblock(p, ch, ch, emb, ss) if updown else _conv(f"{p}.{conv_name}", ch, ch, 3)

    keys = {**_layer("time_embed.0", (emb, mc)), **_layer("time_embed.2", (emb, emb))}
    if u.get("num_classes") == "sequential":  # an ADM vector of adm_in_channels through a two-layer MLP
        keys |= {**_layer("label_emb.0.0", (emb, u.adm_in_channels)), **_layer("label_emb.0.2", (emb, emb))}
    elif u.get("num_classes") is not None:
        keys["label_emb.weight"] = (u.num_classes, emb)
    keys |= _conv("input_blocks.0.0", u.in_channels, mc, 3)
    skips, ch, ds, i = [mc], mc, 1, 1
    for level, mult in enumerate(mults):
        for _ in range(nrb):
            keys |= unet_resblock(f"input_blocks.{i}.0", ch, mult * mc, emb, ss)
            ch = mult * mc
            if ds in u.attention_resolutions:
                keys |= attn(f"input_blocks.{i}.1", ch, level)
            skips, i = skips + [ch], i + 1
        if level != len(mults) - 1:
            keys |= resample(f"input_blocks.{i}.0", ch, "op")
            skips, i, ds = skips + [ch], i + 1, ds * 2
    keys |= {**unet_resblock("middle_block.0", ch, ch, emb, ss), **attn("middle_block.1", ch, None)}
    keys |= unet_resblock("middle_block.2", ch, ch, emb, ss)
    i = 0
    for level, mult in reversed(list(enumerate(mults))):
        for j in range(nrb + 1):
            keys |= unet_resblock(f"output_blocks.{i}.0", ch + skips.pop(), mult * mc, emb, ss)
            ch, sub = mult * mc, 1
            if ds in u.attention_resolutions:
                keys |= attn(f"output_blocks.{i}.1", ch, level)
                sub = 2
            if level and j == nrb:
                keys |= resample(f"output_blocks.{i}.{sub}", ch, "conv")
                ds //= 2
            i += 1
    keys |= {**_norm("out.0", ch), **_conv("out.2", mc, u.out_channels, 3)}
    return keys


def ae_resblock(p: str, c_in: int, c_out: int) -> dict:
    keys = {**_norm(f"{p}.norm1", c_in), **_conv(f"{p}.conv1", c_in, c_out, 3)}
    keys |= {**_norm(f"{p}.norm2", c_out), **_conv(f"{p}.conv2", c_out, c_out, 3)}
    if c_in != c_out:
        keys |= _conv(f"{p}.nin_shortcut", c_in, c_out, 1)
    return keys


def ae_attn(p: str, c: int) -> dict:
    keys = _norm(f"{p}.norm", c)
    for n in ("q", "k", "v", "proj_out"):
        keys |= _conv(f"{p}.{n}", c, c, 1)
    return keys


def ae_mid(p: str, c: int, attention: bool = True) -> dict:
    """Middle block; `attn_type: none` (vq-f4-noattn) makes its attention an identity without weights."""
    attn = ae_attn(f"{p}.attn_1", c) if attention else {}
    return {**ae_resblock(f"{p}.block_1", c, c), **attn, **ae_resblock(f"{p}.block_2", c, c)}


def expected_first_stage(params, vq: bool) -> dict[str, tuple[int, ...]]:
    """Encoder + Decoder + quant_conv + post_quant_conv (+ the VQ codebook) of an autoencoder."""
    dd, e = params.ddconfig, params.embed_dim
    ch, mults, nrb, z = dd.ch, list(dd.ch_mult), dd.num_res_blocks, dd.z_channels
    keys = _conv("encoder.conv_in", dd.in_channels, ch, 3)
    res, c = dd.resolution, ch
    for level, mult in enumerate(mults):
        for b in range(nrb):
            keys |= ae_resblock(f"encoder.down.{level}.block.{b}", c, ch * mult)
            c = ch * mult
            if res in dd.attn_resolutions:
                keys |= ae_attn(f"encoder.down.{level}.attn.{b}", c)
        if level != len(mults) - 1:
            keys |= _conv(f"encoder.down.{level}.downsample.conv", c, c, 3)
            res //= 2
    z_out = 2 * z if dd.double_z else z
    attention = dd.get("attn_type", "vanilla") != "none"
    keys |= {**ae_mid("encoder.mid", c, attention), **_norm("encoder.norm_out", c),
             **_conv("encoder.conv_out", c, z_out, 3)}

    keys |= {**_conv("decoder.conv_in", z, c, 3), **ae_mid("decoder.mid", c, attention)}
    for level in reversed(range(len(mults))):
        for b in range(nrb + 1):
            keys |= ae_resblock(f"decoder.up.{level}.block.{b}", c, ch * mults[level])
            c = ch * mults[level]
            if res in dd.attn_resolutions:
                keys |= ae_attn(f"decoder.up.{level}.attn.{b}", c)
        if level:
            keys |= _conv(f"decoder.up.{level}.upsample.conv", c, c, 3)
            res *= 2
    keys |= {**_norm("decoder.norm_out", c), **_conv("decoder.conv_out", c, dd.out_ch, 3)}

    if vq:
        keys |= {**_conv("quant_conv", z, e, 1), **_conv("post_quant_conv", e, z, 1)}
        keys["quantize.embedding.weight"] = (params.n_embed, e)
    else:
        keys |= {**_conv("quant_conv", 2 * z, 2 * e, 1), **_conv("post_quant_conv", e, z, 1)}
    return keys


# ---------------------------------------------------------------------------------------------
# Builders (meta device: shapes only, no memory, no initialisation cost)
# ---------------------------------------------------------------------------------------------
def build_unet(cfg) -> torch.nn.Module:
    with torch.device("meta"):
        return instantiate_from_config(cfg.model.params.unet_config)


def first_stage_state(params, vq: bool) -> dict[str, tuple[int, ...]]:
    """Shapes of the implementation's Encoder/Decoder, with the 1x1 quant convs and codebook around them."""
    from ldm.modules.diffusionmodules.model import Decoder, Encoder

    dd, e, z = params.ddconfig, params.embed_dim, params.ddconfig.z_channels
    with torch.device("meta"):
        state = {**shapes(Encoder(**dd), "encoder."), **shapes(Decoder(**dd), "decoder.")}
        moments = z if vq else 2 * z
        state |= shapes(torch.nn.Conv2d(moments, e if vq else 2 * e, 1), "quant_conv.")
        state |= shapes(torch.nn.Conv2d(e, z, 1), "post_quant_conv.")
        if vq:
            state |= shapes(torch.nn.Embedding(params.n_embed, e), "quantize.embedding.")
    return state


def assert_same_layout(actual: dict, expected: dict) -> None:
    missing, unexpected = sorted(expected.keys() - actual.keys()), sorted(actual.keys() - expected.keys())
    assert not missing and not unexpected, f"missing {missing[:10]}, unexpected {unexpected[:10]}"
    wrong = {k: (actual[k], expected[k]) for k in expected if actual[k] != expected[k]}
    assert not wrong, f"(actual, expected) shapes differ: {dict(list(wrong.items())[:10])}"


def n_params(layout: dict) -> int:
    return sum(torch.Size(s).numel() for s in layout.values())


# ---------------------------------------------------------------------------------------------
# Every config
# ---------------------------------------------------------------------------------------------
def test_all_published_configs_are_shipped():
    assert EXPECTED_CONFIGS <= set(ALL_CONFIGS), sorted(EXPECTED_CONFIGS - set(ALL_CONFIGS))


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_loads_with_a_model_target(name):
    cfg = load(name)
    assert cfg.model.target.startswith("ldm.models.")
    assert isinstance(cfg.model.base_learning_rate, float)
    if name in EXPECTED_TARGETS:
        model, first, cond = EXPECTED_TARGETS[name]
        p = cfg.model.params
        cond_target = p.cond_stage_config if isinstance(p.cond_stage_config, str) else p.cond_stage_config.target
        assert (cfg.model.target, p.first_stage_config.target, cond_target) == (model, first, cond)
        assert p.unet_config.target == UNET_TARGET


@pytest.mark.parametrize("name", [n for n in ALL_CONFIGS if is_diffusion(load(n))])
def test_unet_state_dict_matches_architecture(name):
    cfg = load(name)
    assert_same_layout(shapes(build_unet(cfg)), expected_unet(cfg.model.params.unet_config.params))


@pytest.mark.parametrize("name", [n for n in ALL_CONFIGS if not is_pixel_space(load(n))])
def test_first_stage_state_dict_matches_architecture(name):
    params, vq = first_stage(load(name))
    assert_same_layout(first_stage_state(params, vq), expected_first_stage(params, vq))


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_latent_shape_is_consistent(name):
    """The UNet works on the latent the first stage produces: channels and spatial size agree."""
    cfg = load(name)
    if is_pixel_space(cfg):  # the UNet works on the images themselves
        p = cfg.model.params
        size = cfg.data.params.train.params.size
        assert p.image_size == p.unet_config.params.image_size == size and p.scale_factor == 1.0
        assert p.channels == p.unet_config.params.in_channels == p.unet_config.params.out_channels == 3
        return
    params, _ = first_stage(cfg)
    dd = params.ddconfig
    factor = 2 ** (len(dd.ch_mult) - 1)
    assert params.embed_dim == dd.z_channels
    if is_diffusion(cfg):
        p = cfg.model.params
        assert p.channels == p.first_stage_config.params.embed_dim
        assert p.unet_config.params.out_channels == p.channels
        if p.get("conditioning_key") not in ("concat", "hybrid", "hybrid-adm"):
            assert p.unet_config.params.in_channels == p.channels
        else:  # the concatenated conditioning widens the UNet's input
            assert p.unet_config.params.in_channels > p.channels
        if name in EXPECTED_CONFIGS:
            # the latent size the model samples at, for the published image size of its data
            assert p.image_size * factor in (256, 512)


# ---------------------------------------------------------------------------------------------
# Published numbers of individual checkpoints
# ---------------------------------------------------------------------------------------------
def test_sd_v1_unet_matches_the_published_checkpoint():
    cfg = load("stable-diffusion/v1-inference.yaml")
    state = shapes(build_unet(cfg))
    assert len(state) == 686
    assert n_params(state) == 859_520_964
    assert n_params(expected_unet(cfg.model.params.unet_config.params)) == 859_520_964
    assert state["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert state["input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)
    assert state["out.2.weight"] == (4, 320, 3, 3)
    assert state["time_embed.0.weight"] == (1280, 320)
    assert state["middle_block.1.transformer_blocks.0.attn1.to_q.weight"] == (1280, 1280)
    assert state["output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)  # upsample after 3 res blocks
    assert state["input_blocks.3.0.op.weight"] == (320, 320, 3, 3)  # downsample
    assert "input_blocks.7.1.proj_in.weight" in state and "input_blocks.10.1.norm.weight" not in state


def test_sd_kl_f8_autoencoder_matches_the_published_checkpoint():
    params, vq = first_stage(load("stable-diffusion/v1-inference.yaml"))
    state = first_stage_state(params, vq)
    assert len(state) == 248
    assert n_params(state) == 83_653_863
    assert state["encoder.down.0.block.0.norm1.weight"] == (128,)
    assert state["decoder.up.3.block.2.conv2.weight"] == (512, 512, 3, 3)
    assert state["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert state["encoder.conv_out.weight"] == (8, 512, 3, 3)
    assert state["quant_conv.weight"] == (8, 8, 1, 1) and state["post_quant_conv.weight"] == (4, 4, 1, 1)
    assert state["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    # every SD v1/v2 text-to-image config uses this same autoencoder
    for name in ("v2-inference.yaml", "v2-inference-v.yaml", "v2-inpainting-inference.yaml"):
        other, _ = first_stage(load(f"stable-diffusion/{name}"))
        assert first_stage_state(other, False) == state


@pytest.mark.parametrize("name", ["v2-inference.yaml", "v2-inference-v.yaml", "v2-inpainting-inference.yaml"])
def test_sd_v2_unet_uses_linear_projections_and_openclip_context(name):
    cfg = load(f"stable-diffusion/{name}")
    state = shapes(build_unet(cfg))
    assert len(state) == 686
    assert state["input_blocks.1.1.proj_in.weight"] == (320, 320)
    assert state["input_blocks.1.1.proj_out.weight"] == (320, 320)
    assert state["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    assert state["middle_block.1.transformer_blocks.0.attn2.to_v.weight"] == (1280, 1024)
    in_channels = 9 if "inpainting" in name else 4
    assert state["input_blocks.0.0.weight"] == (320, in_channels, 3, 3)
    assert n_params(state) == 865_910_724 + 320 * 9 * (in_channels - 4)


def test_sd_v2_v_differs_from_v2_only_in_parameterization():
    eps, v = load("stable-diffusion/v2-inference.yaml"), load("stable-diffusion/v2-inference-v.yaml")
    assert "parameterization" not in eps.model.params and v.model.params.parameterization == "v"
    del v.model.params["parameterization"]
    assert eps == v


def test_x4_upscaler_unet_and_first_stage():
    cfg = load("stable-diffusion/x4-upscaling.yaml")
    state = shapes(build_unet(cfg))
    assert state["input_blocks.0.0.weight"] == (256, 7, 3, 3)  # 4 latent + 3 low-res RGB channels
    assert state["label_emb.weight"] == (1000, 1024)  # noise level as a class label
    # attention at downsampling factors 2, 4, 8: not on the first level
    assert "input_blocks.1.1.norm.weight" not in state
    assert state["input_blocks.4.1.proj_in.weight"] == (512, 512)  # linear projection
    # self-attention replaced by context attention on levels 0-2; level 3 and the middle keep it
    assert state["input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"] == (512, 1024)
    assert state["input_blocks.7.1.transformer_blocks.0.attn1.to_k.weight"] == (512, 1024)
    assert state["input_blocks.10.1.transformer_blocks.0.attn1.to_k.weight"] == (1024, 1024)
    assert state["middle_block.1.transformer_blocks.0.attn1.to_k.weight"] == (1024, 1024)
    # like SD: attention on three of four levels and two channel changes on the way down, plus label_emb
    assert len(state) == 686 + 1
    params, vq = first_stage(cfg)
    fs = first_stage_state(params, vq)
    assert list(params.ddconfig.ch_mult) == [1, 2, 4] and params.ddconfig.z_channels == 4
    assert fs["encoder.conv_out.weight"] == (8, 512, 3, 3)
    assert "encoder.down.2.downsample.conv.weight" not in fs and "decoder.up.3.block.0.conv1.weight" not in fs
    # the SD KL-f8 layout minus one 512-channel level: 2 + 3 res blocks of 8 tensors and a resample conv each side
    assert len(fs) == 248 - (2 + 3) * 8 - 2 * 2


def test_cin_vq_f8_is_class_conditional_via_cross_attention():
    cfg = load("latent-diffusion/cin-ldm-vq-f8.yaml")
    p = cfg.model.params
    assert p.conditioning_key == "crossattn" and p.cond_stage_key == "class_label"
    assert p.cond_stage_config.params.embed_dim == p.unet_config.params.context_dim == 512
    state = shapes(build_unet(cfg))
    assert "label_emb.weight" not in state  # the class goes through cross-attention, not the ADM embedding
    assert state["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (256, 512)
    fs = first_stage_state(*first_stage(cfg))
    assert fs["quantize.embedding.weight"] == (16384, 4)
    assert fs["encoder.down.3.attn.1.q.weight"] == (512, 512, 1, 1)  # attention at resolution 32
    assert fs["decoder.up.3.attn.2.q.weight"] == (512, 512, 1, 1)


def test_adm_style_unets_without_cross_attention():
    churches = shapes(build_unet(load("latent-diffusion/lsun_churches-ldm-kl-8.yaml")))
    assert churches["input_blocks.1.0.emb_layers.1.weight"] == (384, 768)  # scale-shift norm: 2 * 192
    assert churches["input_blocks.3.0.in_layers.2.weight"] == (192, 192, 3, 3)  # resblock downsampling
    assert churches["input_blocks.1.1.qkv.weight"] == (576, 192, 1)
    celeba = shapes(build_unet(load("latent-diffusion/celebahq-ldm-vq-4.yaml")))
    assert "input_blocks.1.1.norm.weight" not in celeba  # no attention at full latent resolution
    assert celeba["input_blocks.4.1.qkv.weight"] == (1344, 448, 1)
