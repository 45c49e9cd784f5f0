"""The Stable Diffusion configs build their FULL models (UNet, autoencoder, text encoder, and the depth stage or
image embedder of depth-to-image and unCLIP; 1.1-2.0 B parameters) with random weights, survive a checkpoint round
trip and hold the keys of the published checkpoints.

Text-encoder weights are not downloadable here: SD v1's FrozenCLIPEmbedder loads a local folder holding the
ViT-L/14 text config with random weights and the CLIP tokenizer written from open_clip's vocabulary; SD v2's
FrozenOpenCLIPEmbedder gets `version: null`, as unCLIP-H's image tower; unCLIP-L's OpenAI CLIP gets `pretrained: false`
and stand-in embedding statistics, the depth stage's MiDaS `model_path: null`. To stay within minutes and ~12 GB on 2 cores the models are built
one at a time in bfloat16, and every random initialiser (all of torch.nn.init ends in Tensor.uniform_ or
Tensor.normal_) fills each tensor with its own constant instead of drawing numbers; two builds use different
constants, so a load that missed or swapped a tensor is still seen.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.modules.encoders.modules import write_clip_tokenizer
from ldm.util import get_obj_from_str, instantiate_from_config

pytestmark = pytest.mark.slow

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs" / "stable-diffusion"
SD_CONFIGS = [
    "v1-inference.yaml",
    "v2-inference.yaml",
    "v2-inference-v.yaml",
    "v2-inpainting-inference.yaml",
    "x4-upscaling.yaml",
    "v2-midas-inference.yaml",
    "v2-1-stable-unclip-h-inference.yaml",
    "v2-1-stable-unclip-l-inference.yaml",
]
UNET_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
VAE_KEY = "first_stage_model.encoder.down.0.block.0.norm1.weight"
CLIP_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
OPENCLIP_KEY = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
DEPTH_KEY = "depth_model.model.pretrained.model.patch_embed.backbone.stem.conv.weight"
OPENCLIP_VISION_KEY = "embedder.model.visual.transformer.resblocks.31.attn.in_proj_weight"
OPENAI_VISION_KEY = "embedder.model.visual.transformer.resblocks.23.attn.in_proj_weight"


@contextlib.contextmanager
def constant_init(salt: float) -> Iterator[None]:
    """Random initialisers fill each tensor with one value of their range, a different one per call and salt."""
    counter = itertools.count(1)
    uniform, normal = torch.Tensor.uniform_, torch.Tensor.normal_

    def fraction() -> float:
        return (next(counter) * 0.6180339887 + salt) % 1.0

    def uniform_(self, a=0.0, b=1.0, *, generator=None):
        return self.fill_(a + (b - a) * fraction())

    def normal_(self, mean=0.0, std=1.0, *, generator=None):
        return self.fill_(mean + std * (fraction() - 0.5))

    torch.Tensor.uniform_, torch.Tensor.normal_ = uniform_, normal_
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        yield
    finally:
        torch.Tensor.uniform_, torch.Tensor.normal_ = uniform, normal
        torch.set_default_dtype(previous_dtype)


@pytest.fixture(scope="module")
def clip_vit_l14_dir(tmp_path_factory):
    """A FrozenCLIPEmbedder folder: the ViT-L/14 text config of SD v1 with random weights, and the CLIP tokenizer."""
    folder = write_clip_tokenizer(tmp_path_factory.mktemp("sd") / "clip-vit-l14-text")
    config = CLIPTextConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                            vocab_size=49408, max_position_embeddings=77, projection_dim=768,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    with constant_init(0.0):
        CLIPTextModel(config).save_pretrained(folder)
    return str(folder)


def model_config(name: str, request: pytest.FixtureRequest):
    """The model part of a shipped SD config, with the text encoder pointed at what exists offline."""
    cfg = OmegaConf.load(CONFIG_ROOT / name).model
    for target in (cfg.target, cfg.params.get("low_scale_config", {}).get("target")):
        if target:
            get_obj_from_str(target)  # a missing class fails here (ConfigError naming it), never skips
    cond = cfg.params.cond_stage_config
    if cond.target.endswith("FrozenCLIPEmbedder"):
        cond.params = {**(cond.get("params") or {}), "version": request.getfixturevalue("clip_vit_l14_dir")}
    else:
        cond.params.version = None
    if "embedder_config" in cfg.params:  # unCLIP: the image tower with random weights, stand-in statistics
        embedder = cfg.params.embedder_config
        key = "pretrained" if embedder.target.endswith("ClipImageEmbedder") else "version"
        embedder.params = {**(embedder.get("params") or {}), key: False if key == "pretrained" else None}
        noise_aug = cfg.params.noise_aug_config.params
        if noise_aug.get("clip_stats_path"):
            path = request.getfixturevalue("tmp_path") / "clip_stats.th"
            torch.save((torch.zeros(noise_aug.timestep_dim), torch.ones(noise_aug.timestep_dim)), path)
            noise_aug.clip_stats_path = str(path)
    if "depth_stage_config" in cfg.params:  # depth-to-image: MiDaS DPT-Hybrid with random weights
        cfg.params.depth_stage_config.params.model_path = None
    return cfg


def sample(t: torch.Tensor) -> torch.Tensor:
    """Up to ~1000 evenly spaced entries of a tensor, as float64: its fingerprint."""
    flat = t.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // 1000)].double().clone()


@pytest.mark.parametrize("name", SD_CONFIGS)
def test_sd_config_builds_full_model_and_round_trips(name, request, tmp_path):
    cfg = model_config(name, request)
    with constant_init(0.1):
        model = instantiate_from_config(cfg)
    state = model.state_dict()
    layout = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    fingerprint = {k: sample(v) for k, v in state.items()}
    n_text = sum(p.numel() for p in model.cond_stage_model.parameters())

    # the x4 upscaler has no attention at full latent resolution: its first transformer is in input block 4
    assert {UNET_KEY.replace("blocks.1.1", "blocks.4.1") if name.startswith("x4") else UNET_KEY, VAE_KEY} <= set(state)
    if name.startswith("v1"):
        assert CLIP_KEY in state and layout[CLIP_KEY][0] == (49408, 768)
        assert n_text == 123_060_480  # CLIP ViT-L/14 text transformer
        # SD v1 checkpoints hold 197 cond_stage_model tensors, one of them the legacy position_ids
        assert sum(k.startswith("cond_stage_model.") for k in state) == 196
    else:
        assert OPENCLIP_KEY in state and layout[OPENCLIP_KEY][0] == (3 * 1024, 1024)
        assert n_text == 354_032_641  # OpenCLIP ViT-H/14 text transformer, with text_projection and logit_scale
        assert not any(k.startswith("cond_stage_model.model.visual.") for k in state)
    # the image embedder / depth stage: published keys and sizes (open_clip ViT-H-14: 986,109,441 parameters of
    # which the image tower 632,076,800, the embedder keeps all but the 302,309,376 of the text transformer; OpenAI
    # ViT-L/14: 427,616,513 in all; dpt_hybrid-midas-501f0c75.pt: 368 tensors)
    extra_stage = {"v2-midas-inference.yaml": "depth_model", "v2-1-stable-unclip-h-inference.yaml": "embedder",
                   "v2-1-stable-unclip-l-inference.yaml": "embedder"}.get(name)
    if name.startswith("v2-midas"):
        assert DEPTH_KEY in state and sum(k.startswith("depth_model.") for k in state) == 368
    elif extra_stage:
        vision_key, n_params = {"h": (OPENCLIP_VISION_KEY, 986_109_441 - 302_309_376),
                                "l": (OPENAI_VISION_KEY, 427_616_513)}[name[len("v2-1-stable-unclip-")]]
        assert vision_key in state and sum(p.numel() for p in model.embedder.parameters()) == n_params
        if name.startswith("v2-1-stable-unclip-h"):
            assert sum(p.numel() for p in model.embedder.model.visual.parameters()) == 632_076_800
            assert not any(k.startswith("embedder.model.transformer.") for k in state)
    # the frozen text encoder (and image / depth stage) stays in eval mode and out of the optimiser
    model.train()
    for frozen in [model.cond_stage_model] + ([getattr(model, extra_stage)] if extra_stage else []):
        assert not frozen.training
        assert not {id(p) for p in model.trainable_parameters()} & {id(p) for p in frozen.parameters()}

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state}, path)
    del model, state
    gc.collect()

    with constant_init(0.6):
        rebuilt = instantiate_from_config(cfg)
    # the second build really starts from other weights: every non-zero UNet/VAE weight matrix differs
    differing = {k for k, v in rebuilt.state_dict().items() if not torch.equal(sample(v), fingerprint[k])}
    drawn = {k for k, (shape, _) in layout.items() if k.startswith(("model.", "first_stage_model."))
             and k.endswith(".weight") and len(shape) >= 2 and fingerprint[k].any()}
    assert len(drawn) > 300 and drawn <= differing
    loaded = torch.load(path, mmap=True, weights_only=True)["state_dict"]
    assert set(loaded) == set(layout)
    rebuilt.load_state_dict(loaded, strict=True)
    for key, value in rebuilt.state_dict().items():
        assert (tuple(value.shape), value.dtype) == layout[key], key
        assert torch.equal(value, loaded[key]), key
        assert torch.equal(sample(value), fingerprint[key]), key
    del rebuilt, loaded
    gc.collect()
    path.unlink()  # 2-4 GB per config: pytest keeps the last three runs' temporary folders
