"""CLIP image (and OpenAI-CLIP text) encoders of latent-diffusion and Stable Diffusion 2 (unCLIP), on open_clip.

- `FrozenOpenCLIPImageEmbedder` (SD 2.1 unCLIP-H): an open_clip vision tower (ViT-H-14); state_dict keys are open_clip's
  `model.*` without the text transformer, as the original (which deleted `model.transformer` only).
- `ClipImageEmbedder` (SD 2.1 unCLIP-L) and `FrozenClipImageEmbedder` (latent-diffusion): OpenAI CLIP (`ViT-L/14`,
  ...) image embeddings. The original loaded the whole model with OpenAI's `clip.load`; open_clip builds the same
  model, with the same key layout (`model.visual.*`, `model.transformer.*`, `model.token_embedding.weight`, ...),
  and reads OpenAI's checkpoint files (the `~/.cache/clip/<name>.pt` that `clip.load` downloads, or any path).
- `FrozenCLIPTextEmbedder` (latent-diffusion): OpenAI CLIP's projected, normalised text embedding.

Images come in [-1, 1] and are preprocessed as the originals did (kornia: bicubic resize to the tower's input size
with aligned corners, optional antialiasing, then CLIP's mean/std). `pretrained=False` (OpenAI models) or
`version: null` (open_clip) builds random weights — for tests, or when a checkpoint holding the embedder follows.
Re-exported by `ldm.modules.encoders.modules`, the original path.
"""
from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ldm.modules.encoders.frozen import (
    FrozenEncoder,
    _first_line,
    _openclip_checkpoint,
    _unavailable,
    load_openclip_part,
)
from ldm.modules.encoders.modules import _looks_like_path
from ldm.util import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EMBEDDER_VERSION_KEY = "embedder_config.params.version"


def _openclip_config(arch: str | Mapping[str, Any], owner: str) -> dict[str, Any]:
    """open_clip's model config of `arch` (a name, or the config itself as a mapping: embed_dim, vision_cfg,
    text_cfg), or one error naming the known ones."""
    import open_clip

    if isinstance(arch, Mapping):
        return {key: dict(value) if isinstance(value, Mapping) else value for key, value in arch.items()}
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ConfigError(f"{owner}: arch '{arch}' is not an open_clip model config (e.g. "
                          f"{', '.join(open_clip.list_models()[:8])}, ...; see open_clip.list_models())")
    return cfg


class CLIPImagePreprocessing:
    """The originals' preprocessing of [-1, 1] images for a CLIP vision tower (mixin for nn.Modules)."""

    image_size: tuple[int, int]
    antialias: bool

    def _init_preprocessing(self, image_size: int | Sequence[int], antialias: bool) -> None:
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.antialias = antialias
        self.register_buffer("mean", torch.tensor(CLIP_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images [B, 3, H, W] resized (bicubic, aligned corners, antialiased when set) to the tower's size,
        mapped to [0, 1] and normalised with CLIP's mean and std."""
        import kornia

        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{type(self).__name__}: expects RGB images [B, 3, H, W] in [-1, 1], got {tuple(x.shape)}")
        x = kornia.geometry.resize(x, self.image_size, interpolation="bicubic", align_corners=True,
                                   antialias=self.antialias)
        x = (x + 1.0) / 2.0
        return kornia.enhance.normalize(x, self.mean, self.std)


def drop_embeddings(z: torch.Tensor, rate: float) -> torch.Tensor:
    """z with each row zeroed with probability `rate` (the originals' ucg dropout of image embeddings)."""
    keep = torch.bernoulli((1.0 - rate) * torch.ones(z.shape[0], device=z.device))
    return keep[:, None].to(z.dtype) * z


# ---------------------------------------------------------------------------------------------- open_clip vision


class OpenCLIPVisionModel(nn.Module):
    """An open_clip `CLIP` model without its text transformer: the vision tower `visual` plus the text-side tensors
    the original kept (token_embedding, positional_embedding, ln_final, text_projection, logit_scale), so the
    state_dict keys are those of SD 2.1 unCLIP-H checkpoints (`embedder.model.*`)."""

    def __init__(self, arch: str, owner: str = "FrozenOpenCLIPImageEmbedder"):
        super().__init__()
        from open_clip.model import CLIPTextCfg, _build_vision_tower

        cfg = _openclip_config(arch, owner)
        if cfg["vision_cfg"].get("timm_model_name") or isinstance(cfg["vision_cfg"].get("layers"), (list, tuple)):
            raise ConfigError(f"{owner}: arch '{arch}' has a timm / ResNet vision tower; only CLIP ViTs (ViT-H-14, "
                              "ViT-L-14, ...) have the Stable Diffusion unCLIP layout")
        self.visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False))
        text = CLIPTextCfg(**cfg["text_cfg"])
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.positional_embedding = nn.Parameter(torch.empty(text.context_length, text.width))
        self.ln_final = nn.LayerNorm(text.width)
        self.text_projection = nn.Parameter(torch.empty(text.width, cfg["embed_dim"]))
        shape = [1] if cfg.get("nonscalar_logit_scale") else []
        self.logit_scale = nn.Parameter(torch.full(shape, float(np.log(1 / 0.07))))
        if cfg.get("init_logit_bias") is not None:
            self.logit_bias = nn.Parameter(torch.full(shape, float(cfg["init_logit_bias"])))
        # open_clip's initialisation of these (they are unused by the image path)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=text.width**-0.5)


class FrozenOpenCLIPImageEmbedder(CLIPImagePreprocessing, FrozenEncoder):
    """The OpenCLIP vision transformer of SD 2.1 unCLIP-H: [-1, 1] images -> pooled image embeddings [B, embed_dim].

    `version`: an open_clip pretrained tag (e.g. 'laion2b_s32b_b79k'), a local checkpoint file or a folder holding
    one, or None for random weights. `ucg_rate` zeroes whole embeddings at that rate whenever the embedder runs
    (unless `no_dropout`), as the original. Only layer 'pooled' exists (the original's 'penultimate' was never
    implemented).
    """

    LAYERS = ("pooled",)

    def __init__(self, arch: str = "ViT-H-14", version: str | os.PathLike[str] | None = "laion2b_s32b_b79k",
                 device: Any = "cuda", max_length: int = 77, freeze: bool = True, layer: str = "pooled",
                 antialias: bool = True, ucg_rate: float = 0.0):
        super().__init__()
        del device  # config compatibility only: placement follows the module
        owner = type(self).__name__
        if layer not in self.LAYERS:
            raise ValueError(f"{owner}: layer must be 'pooled' (the only image layer the original implemented), "
                             f"got {layer!r}")
        if not 0.0 <= ucg_rate <= 1.0:
            raise ValueError(f"{owner}: ucg_rate must lie in [0, 1], got {ucg_rate}")
        checkpoint = None if version is None else _openclip_checkpoint(arch, os.fspath(version), owner,
                                                                        EMBEDDER_VERSION_KEY)
        self.model = OpenCLIPVisionModel(arch, owner)
        self.arch, self.max_length, self.layer, self.ucg_rate = arch, max_length, layer, ucg_rate
        self._init_preprocessing(self.model.visual.image_size, antialias)
        if checkpoint is not None:
            self._load_weights(checkpoint)
        if freeze:
            self.freeze()

    def _load_weights(self, path: str) -> None:
        """Load everything but the text transformer from the open_clip checkpoint file `path`."""
        load_openclip_part(self.model, path, self.arch, skip="transformer.", part="vision tower")
        logger.info("FrozenOpenCLIPImageEmbedder: loaded %s weights from %s", self.arch, path)

    def forward(self, image: torch.Tensor, no_dropout: bool = False) -> torch.Tensor:
        """Pooled embeddings [B, embed_dim] of [-1, 1] images [B, 3, H, W]."""
        z = self.encode_with_vision_transformer(image)
        if self.ucg_rate > 0.0 and not no_dropout:
            z = drop_embeddings(z, self.ucg_rate)
        return z

    def encode_with_vision_transformer(self, img: torch.Tensor) -> torch.Tensor:
        """The vision tower's pooled, projected output for preprocessed `img`."""
        return self.model.visual(self.preprocess(img))

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Same as `forward`."""
        return self(image)


# ---------------------------------------------------------------------------------------------- OpenAI CLIP


# the names OpenAI's `clip.load` knows, which published configs use
OPENAI_MODELS = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px")


def openai_arch(name: str) -> str:
    """open_clip's architecture name for an OpenAI CLIP name: 'ViT-L/14' -> 'ViT-L-14', 'ViT-L/14@336px' ->
    'ViT-L-14-336'; open_clip names pass through."""
    return name.replace("/", "-").replace("@336px", "-336")


def load_openai_clip(model: str | os.PathLike[str], pretrained: bool, owner: str, key: str) -> nn.Module:
    """The whole OpenAI CLIP model `model` (an OpenAI name such as 'ViT-L/14', an open_clip architecture, or a
    checkpoint file) as an open_clip `CLIP` with QuickGELU and OpenAI's key layout, in float32 on the CPU.

    pretrained=False gives random weights of that architecture. Weights come from a file, or for a name from
    OpenAI's download (cached at ~/.cache/clip, as `clip.load` caches it); anything else is one
    MissingPretrainedModelError naming `key`."""
    import open_clip

    name = os.fspath(model)
    hint = (f"Point `{key.rsplit('.', 1)[-1]}` ({key} in a config) at an OpenAI CLIP checkpoint file (e.g. "
            "~/.cache/clip/ViT-L-14.pt), or set pretrained: false for random weights.")
    if Path(name).expanduser().is_file():
        if not pretrained:
            raise ConfigError(f"{owner}: {key} is a checkpoint file '{name}' but pretrained is false; give an "
                              "architecture name for random weights")
        return _load_openai_file(str(Path(name).expanduser()), owner, hint)
    arch = openai_arch(name)
    if open_clip.get_model_config(arch) is None:
        if _looks_like_path(name) or name.endswith((".pt", ".pth", ".bin", ".ckpt", ".safetensors")):
            raise _unavailable(f"{owner} model", name, "there is no such file", hint)
        raise ConfigError(f"{owner}: {key} '{name}' is neither a file nor an OpenAI CLIP name "
                          f"({', '.join(OPENAI_MODELS)}) or open_clip architecture")
    if not pretrained:
        from open_clip.model import CLIP

        cfg = {**open_clip.get_model_config(arch), "quick_gelu": True}  # OpenAI's models use QuickGELU
        if cfg.pop("custom_text", False):
            raise ConfigError(f"{owner}: {key} '{name}' has a custom text tower, not OpenAI CLIP's layout")
        return CLIP(**cfg)
    if not open_clip.get_pretrained_url(arch, "openai"):
        raise ConfigError(f"{owner}: {key} '{name}' has no OpenAI weights; use one of {', '.join(OPENAI_MODELS)} "
                          "or pretrained: false")
    try:
        return open_clip.load_openai_model(arch, precision="fp32", device="cpu")
    except (OSError, RuntimeError, ValueError) as err:
        reason = f"it is not in ~/.cache/clip and could not be downloaded ({_first_line(err)})"
        raise _unavailable(f"{owner} OpenAI CLIP weights", name, reason, hint) from None


def _load_openai_file(path: str, owner: str, hint: str) -> nn.Module:
    """An OpenAI CLIP checkpoint file (TorchScript archive or state dict) as an open_clip CLIP."""
    import open_clip

    try:
        return open_clip.load_openai_model(path, precision="fp32", device="cpu")
    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{owner}: '{path}' is not an OpenAI CLIP checkpoint ({_first_line(err)}). {hint}") \
            from None


class ClipImageEmbedder(CLIPImagePreprocessing, FrozenEncoder):
    """OpenAI CLIP image embeddings (SD 2.1 unCLIP-L: `model: ViT-L/14`): [-1, 1] images -> [B, embed_dim].

    The whole CLIP model is kept as `model` (keys `model.visual.*`, `model.transformer.*`, ...), as the original;
    `ucg_rate` zeroes whole embeddings at that rate whenever it runs (unless `no_dropout`). Trainable unless its
    owner freezes it (ImageEmbeddingConditionedLatentDiffusion does). `jit` is accepted for config compatibility:
    the eager model computes the same function.
    """

    def __init__(self, model: str | os.PathLike[str], jit: bool = False, device: Any = "cuda",
                 antialias: bool = True, ucg_rate: float = 0.0, pretrained: bool = True):
        super().__init__()
        del device, jit  # config compatibility only: placement follows the module; eager and JIT compute the same
        if not 0.0 <= ucg_rate <= 1.0:
            raise ValueError(f"{type(self).__name__}: ucg_rate must lie in [0, 1], got {ucg_rate}")
        self.model = load_openai_clip(model, pretrained, type(self).__name__, "embedder_config.params.model")
        self.ucg_rate = ucg_rate
        self._init_preprocessing(self.model.visual.image_size, antialias)

    def forward(self, x: torch.Tensor, no_dropout: bool = False) -> torch.Tensor:
        """Image embeddings [B, embed_dim] of [-1, 1] images, in the images' dtype."""
        out = self.model.encode_image(self.preprocess(x)).to(x.dtype)
        if self.ucg_rate > 0.0 and not no_dropout:
            out = drop_embeddings(out, self.ucg_rate)
        return out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Same as `forward`."""
        return self(x)


class FrozenClipImageEmbedder(ClipImageEmbedder):
    """latent-diffusion's OpenAI CLIP image encoder (no antialiasing by default, no dropout), frozen."""

    def __init__(self, model: str | os.PathLike[str], jit: bool = False, device: Any = "cuda",
                 antialias: bool = False, pretrained: bool = True):
        super().__init__(model, jit, device, antialias, ucg_rate=0.0, pretrained=pretrained)
        self.freeze()


class FrozenCLIPTextEmbedder(FrozenEncoder):
    """latent-diffusion's OpenAI CLIP text encoder: text -> the projected text embedding [B, D], L2-normalised when
    `normalize`; `encode` repeats it `n_repeat` times as a context [B, n_repeat, D]. Frozen."""

    def __init__(self, version: str | os.PathLike[str] = "ViT-L/14", device: Any = "cuda", max_length: int = 77,
                 n_repeat: int = 1, normalize: bool = True, pretrained: bool = True):
        super().__init__()
        del device  # config compatibility only: placement follows the module
        self.model = load_openai_clip(version, pretrained, type(self).__name__, "cond_stage_config.params.version")
        self.max_length = max_length  # stored as the original did; tokens always fill the model's context
        self.n_repeat, self.normalize = n_repeat, normalize
        self.freeze()

    def forward(self, text: str | Sequence[str]) -> torch.Tensor:
        """Text embeddings [B, D] (CLIP's tokenizer, zero-padded to the model's context length, truncated)."""
        import open_clip

        tokens = open_clip.tokenize(text, context_length=self.model.context_length).to(self.device)
        z = self.model.encode_text(tokens)
        if self.normalize:
            z = z / torch.linalg.norm(z, dim=1, keepdim=True)
        return z

    def encode(self, text: str | Sequence[str]) -> torch.Tensor:
        """The embedding as a context of n_repeat tokens [B, n_repeat, D]."""
        z = self(text)
        if z.ndim == 2:
            z = z[:, None, :]
        return z.repeat(1, self.n_repeat, 1)
