"""Frozen pretrained text encoders of Stable Diffusion: CLIP (v1), OpenCLIP (v2) and any transformers encoder.

Names, constructor parameters and state_dict keys follow the original `ldm.modules.encoders.modules`; they are
re-exported there. `device` parameters are accepted for config compatibility only: tokens always go to the
device of the module's parameters. Weights come from a local folder or file, or from a hub id that is already
cached (or downloadable); anything else ends in one `MissingPretrainedModelError` that says what to do.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ldm.modules.encoders.modules import AbstractEncoder, _has_vocabulary, _looks_like_path, atomic_folder
from ldm.util import CheckpointError, ConfigError, load_state_dict

logger = logging.getLogger(__name__)

VERSION_KEY = "cond_stage_config.params.version"
# Checkpoint file names open_clip uses inside a model folder, preferred first.
OPENCLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pt")


class MissingPretrainedModelError(ConfigError):
    """Pretrained weights named by a config could not be found locally nor fetched; the message says how to fix it."""


class FrozenEncoder(AbstractEncoder):
    """Base of the pretrained encoders: `freeze()` makes them eval-only and gradient-free, and they stay so."""

    frozen: bool = False

    def freeze(self) -> None:
        """Eval mode and requires_grad=False for every parameter; later `.train()` calls keep eval mode."""
        self.frozen = True
        self.eval()
        for param in self.parameters():
            param.requires_grad = False

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Like `nn.Module.train`, except that a frozen encoder always stays in eval mode."""
        return super().train(mode and not self.frozen)

    @property
    def device(self) -> torch.device:
        """Where the encoder's parameters live, hence where its tokens are sent."""
        return next(self.parameters()).device

    def encode(self, text: str | Sequence[str]) -> torch.Tensor:
        """Same as `forward` (the conditioning used by LatentDiffusion)."""
        return self(text)


def _check_layer(owner: str, layer: str, layers: Sequence[str]) -> None:
    """Raise a one-line error unless `layer` is one of `layers`."""
    if layer not in layers:
        raise ValueError(f"{owner}: layer must be one of {', '.join(map(repr, layers))}, got {layer!r}")


def _unavailable(what: str, name: str, reason: str, hint: str) -> MissingPretrainedModelError:
    """The one error users see when pretrained weights cannot be had."""
    return MissingPretrainedModelError(f"{what} '{name}' is not available: {reason}. {hint}")


def _first_line(err: BaseException) -> str:
    """`TypeName: first line of the message`, short enough for a one-line error."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def load_pretrained(load: Callable[[str], Any], version: str | os.PathLike[str], what: str, hint: str) -> Any:
    """`load(version)` for a local folder or a hub id, turning every failure into one MissingPretrainedModelError."""
    name = os.fspath(version)
    local = Path(name).expanduser()
    if local.is_dir():
        try:
            return load(str(local))
        except (OSError, ValueError) as err:
            raise _unavailable(what, str(local), f"the folder could not be loaded ({_first_line(err)})", hint) from None
    if _looks_like_path(name) or local.exists():
        raise _unavailable(what, str(local), "there is no such folder", hint)
    try:
        return load(name)
    except (OSError, ValueError) as err:
        reason = (
            "there is no local folder of that name, it is not in the Hugging Face cache, and the hub could not "
            f"provide it ({_first_line(err)})"
        )
        raise _unavailable(what, name, reason, hint) from None


class FrozenHFTextEmbedder(FrozenEncoder):
    """Any transformers text encoder (hub id or local folder): text → hidden states [B, max_length, hidden]."""

    LAYERS = ("last", "pooled", "hidden")
    # What the hints in errors call a usable folder; subclasses name their own.
    folder_hint = "a folder saved by `save_pretrained` (config, weights and tokenizer files)"
    pass_attention_mask = True

    def __init__(
        self,
        version: str | os.PathLike[str],
        device: Any = "cuda",
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        layer_idx: int | None = None,
        always_return_pooled: bool = False,
    ):
        super().__init__()
        del device  # config compatibility only: placement follows the module
        owner = type(self).__name__
        self.always_return_pooled = always_return_pooled
        _check_layer(owner, layer, self.LAYERS)
        if layer == "hidden" and layer_idx is None:
            raise ValueError(f"{owner}: layer='hidden' needs layer_idx (which entry of the hidden states to return)")
        self.layer = layer
        self.layer_idx = layer_idx
        self.max_length = max_length
        hint = (
            f"Point `version` ({VERSION_KEY} in a config) at a local folder holding {self.folder_hint}; "
            "set HF_HUB_OFFLINE=1 to skip hub retries."
        )
        self.transformer = load_pretrained(self._load_model, version, f"{owner} model", hint)
        self.tokenizer = load_pretrained(self._load_tokenizer, version, f"{owner} tokenizer", hint)
        if layer == "hidden":
            n_states = self.transformer.config.num_hidden_layers + 1
            if not -n_states <= layer_idx < n_states:
                raise ValueError(f"{owner}: layer_idx={layer_idx} is out of range for {n_states} hidden states")
        if freeze:
            self.freeze()

    def _load_model(self, source: str) -> nn.Module:
        """The transformers model at `source`."""
        from transformers import AutoModel

        return AutoModel.from_pretrained(source)

    def _load_tokenizer(self, source: str) -> Any:
        """The tokenizer at `source`; a tokenizer that knows only its special tokens counts as missing."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
        if not _has_vocabulary(tokenizer):
            raise OSError("no tokenizer vocabulary found")
        return tokenizer

    def forward(self, text: str | Sequence[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [B, max_length, hidden] (layer 'last'/'hidden') or [B, 1, hidden] (layer 'pooled'); with
        `always_return_pooled` also the pooled embedding [B, hidden] (a conditioner's vector, as SDXL's)."""
        if isinstance(text, str):
            text = [text]
        batch = self.tokenizer(
            list(text), truncation=True, max_length=self.max_length, padding="max_length", return_tensors="pt"
        )
        kwargs = {"attention_mask": batch["attention_mask"].to(self.device)} if self.pass_attention_mask else {}
        outputs = self.transformer(
            input_ids=batch["input_ids"].to(self.device), output_hidden_states=self.layer == "hidden", **kwargs
        )
        if self.layer == "pooled" or self.always_return_pooled:
            if getattr(outputs, "pooler_output", None) is None:
                raise ValueError(f"{type(self).__name__}: this model has no pooled output; use layer 'last' or 'hidden' "
                                 "without always_return_pooled")
        if self.layer == "last":
            z = outputs.last_hidden_state
        elif self.layer == "pooled":
            z = outputs.pooler_output[:, None, :]
        else:
            z = outputs.hidden_states[self.layer_idx]
        return (z, outputs.pooler_output) if self.always_return_pooled else z


class FrozenCLIPEmbedder(FrozenHFTextEmbedder):
    """The CLIP text encoder of Stable Diffusion v1 (transformers CLIPTokenizer + CLIPTextModel).

    State-dict keys are `transformer.text_model....`, as SD v1 checkpoints hold them under `cond_stage_model.`.
    """

    folder_hint = (
        "a CLIPTextModel (config.json + weights) and a CLIP tokenizer (vocab.json + merges.txt; "
        "`ldm.modules.encoders.modules.write_clip_tokenizer` writes one)"
    )
    pass_attention_mask = False  # as the original: causal attention, padding with <|endoftext|>

    def __init__(
        self,
        version: str | os.PathLike[str] = "openai/clip-vit-large-patch14",
        device: Any = "cuda",
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        layer_idx: int | None = None,
        always_return_pooled: bool = False,
    ):
        super().__init__(version, device, max_length, freeze, layer, layer_idx, always_return_pooled)
        # Older transformers saved the position ids; SD v1 checkpoints carry them. They are a constant: drop them.
        self.register_load_state_dict_pre_hook(_drop_legacy_position_ids)

    def _load_model(self, source: str) -> nn.Module:
        """The CLIPTextModel at `source` (a text-only or a full CLIP folder)."""
        from transformers import CLIPTextModel

        model = CLIPTextModel.from_pretrained(source)
        # transformers 5 dropped the `text_model` level that SD v1 checkpoint keys (and transformers 4) have
        return model if hasattr(model, "text_model") else CLIPTextModelKeys(model)

    def _load_tokenizer(self, source: str) -> Any:
        """The CLIPTokenizer at `source`, capped at `max_length` tokens."""
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(source, model_max_length=self.max_length)
        if not _has_vocabulary(tokenizer):
            raise OSError("no vocab.json/merges.txt or tokenizer.json found")
        return tokenizer


class CLIPTextModelKeys(nn.Module):
    """Holds a transformers-5 CLIPTextModel as `text_model`, so keys read `text_model.embeddings...` as in SD v1."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model

    @property
    def config(self) -> Any:
        """The wrapped model's config."""
        return self.text_model.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's outputs."""
        return self.text_model(*args, **kwargs)


def _drop_legacy_position_ids(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Remove `transformer.text_model.embeddings.position_ids` when the model no longer stores it."""
    key = prefix + "transformer.text_model.embeddings.position_ids"
    if key in state_dict and "transformer.text_model.embeddings.position_ids" not in module.state_dict():
        del state_dict[key]


def write_clip_tokenizer(out_dir: str | os.PathLike[str]) -> Path:
    """Write OpenAI's CLIP BPE tokenizer (vocab.json + merges.txt, 49408 tokens) from the vocabulary open_clip ships.

    The result loads with `CLIPTokenizer.from_pretrained(out_dir)` and gives the token ids of
    `openai/clip-vit-large-patch14` (open_clip additionally fixes mojibake and HTML entities first).
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # the first line is a header; CLIP uses the first 48894 merges
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **special}
    out = Path(out_dir)
    with atomic_folder(out) as tmp:
        (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    logger.info("wrote a CLIP tokenizer with %d tokens to %s", len(tokens), out)
    return out


class OpenCLIPTextModel(nn.Module):
    """The text side of an open_clip `CLIP` model, with its attribute (hence state_dict) names; no vision tower."""

    def __init__(self, arch: str):
        super().__init__()
        import open_clip
        from open_clip.model import _build_text_tower

        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise ConfigError(
                f"FrozenOpenCLIPEmbedder: arch '{arch}' is not an open_clip model config "
                f"(e.g. {', '.join(open_clip.list_models()[:8])}, ...; see open_clip.list_models())"
            )
        if cfg.get("custom_text") or cfg["text_cfg"].get("hf_model_name"):
            raise ConfigError(
                f"FrozenOpenCLIPEmbedder: arch '{arch}' has a custom/Hugging Face text tower; only CLIP-style "
                "text transformers (ViT-H-14, ViT-bigG-14, ...) have the Stable Diffusion layout"
            )
        text = _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], quick_gelu=cfg.get("quick_gelu", False))
        self.transformer = text.transformer
        self.context_length = text.context_length
        self.vocab_size = text.vocab_size
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection
        self.register_buffer("attn_mask", text.attn_mask, persistent=False)
        shape = [1] if cfg.get("nonscalar_logit_scale") else []
        self.logit_scale = nn.Parameter(torch.full(shape, float(np.log(1 / 0.07))))
        if cfg.get("init_logit_bias") is not None:
            self.logit_bias = nn.Parameter(torch.full(shape, float(cfg["init_logit_bias"])))


class FrozenOpenCLIPEmbedder(FrozenEncoder):
    """The OpenCLIP text encoder of Stable Diffusion v2: text → [B, max_length, width] after `ln_final`.

    layer 'last' runs every residual block, 'penultimate' stops before the last one (SD v2 uses this).
    State-dict keys are open_clip's `model.*` without the vision tower (`model.transformer.resblocks.N...`).
    `version` is an open_clip pretrained tag (e.g. 'laion2b_s32b_b79k'), a local checkpoint file or a folder
    holding one, or None for random weights.
    """

    LAYERS = ("last", "penultimate")

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str | os.PathLike[str] | None = "laion2b_s32b_b79k",
        device: Any = "cuda",
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
    ):
        super().__init__()
        del device  # config compatibility only: placement follows the module
        _check_layer(type(self).__name__, layer, self.LAYERS)
        # find the weights before building a large text tower that could not be filled
        checkpoint = None if version is None else _openclip_checkpoint(arch, os.fspath(version))
        self.model = OpenCLIPTextModel(arch)
        if not 1 <= max_length <= self.model.context_length:
            raise ValueError(
                f"FrozenOpenCLIPEmbedder: max_length must lie in [1, {self.model.context_length}] for arch "
                f"'{arch}', got {max_length}"
            )
        self.arch = arch
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = {"last": 0, "penultimate": 1}[layer]
        if checkpoint is not None:
            self._load_weights(arch, checkpoint)
        if freeze:
            self.freeze()

    def _load_weights(self, arch: str, path: str) -> None:
        """Load the text-side weights of the open_clip checkpoint file `path` (vision weights are skipped)."""
        load_openclip_part(self.model, path, arch, skip="visual.", part="text tower")
        logger.info("FrozenOpenCLIPEmbedder: loaded %s text weights from %s", arch, path)

    def forward(self, text: str | Sequence[str]) -> torch.Tensor:
        """Token features [B, max_length, width] of `text` (open_clip tokenizer, zero padding)."""
        import open_clip

        tokens = open_clip.tokenize(text, context_length=self.max_length).to(self.device)
        return self.encode_with_transformer(tokens)

    def encode_with_transformer(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] → features [B, T, width]: embeddings, the residual blocks up to `layer`, `ln_final`."""
        model, n = self.model, tokens.shape[1]
        x = model.token_embedding(tokens) + model.positional_embedding[:n]
        mask = model.attn_mask[:n, :n] if model.attn_mask is not None else None
        batch_first = getattr(model.transformer, "batch_first", False)
        if not batch_first:
            x = x.permute(1, 0, 2)  # older open_clip runs the stack as [T, B, D]
        blocks = model.transformer.resblocks
        for block in blocks[: len(blocks) - self.layer_idx]:
            x = block(x, attn_mask=mask)
        if not batch_first:
            x = x.permute(1, 0, 2)
        return model.ln_final(x)


def load_openclip_part(model: nn.Module, path: str, arch: str, skip: str, part: str) -> None:
    """Load an open_clip checkpoint file into `model`, one tower of it: keys starting with `skip` are left out,
    and every other key must match (one CheckpointError naming the file otherwise)."""
    state = {k.removeprefix("module."): v for k, v in load_state_dict(path).items()}
    state = {k: v for k, v in state.items() if not k.startswith(skip)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint '{path}' does not hold the {part} of open_clip '{arch}': "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]} (first 5 of each)"
        )


def _openclip_checkpoint(arch: str, version: str, owner: str = "FrozenOpenCLIPEmbedder",
                         key: str = VERSION_KEY) -> str:
    """The local checkpoint file for `version`: itself, the open_clip file in a folder, or a downloaded tag (`owner`
    and the config `key` name the culprit in errors)."""
    import open_clip

    hint = (
        f"Point `version` ({key} in a config) at a local open_clip checkpoint file or a folder holding "
        f"{' or '.join(OPENCLIP_WEIGHT_FILES)}, or set it to null for random weights; set HF_HUB_OFFLINE=1 to "
        "skip hub retries."
    )
    local = Path(version).expanduser()
    if local.is_file():
        return str(local)
    if local.is_dir():
        for name in OPENCLIP_WEIGHT_FILES:
            if (local / name).is_file():
                return str(local / name)
        raise _unavailable("open_clip checkpoint folder", str(local), "it holds no weights file", hint)
    if _looks_like_path(version) or local.suffix in (".bin", ".pt", ".pth", ".ckpt", ".safetensors"):
        raise _unavailable("open_clip checkpoint", str(local), "there is no such file or folder", hint)
    cfg = open_clip.get_pretrained_cfg(arch, version)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise ConfigError(
            f"{owner}: '{version}' is neither a local file/folder nor an open_clip pretrained tag "
            f"of arch '{arch}' (known tags: {tags}); set {key}"
        )
    try:
        path = open_clip.download_pretrained(cfg)
    except (OSError, ValueError, RuntimeError) as err:
        reason = f"it is not in the local cache and could not be downloaded ({_first_line(err)})"
        raise _unavailable(f"open_clip weights {arch}", version, reason, hint) from None
    if not path:
        raise _unavailable(f"open_clip weights {arch}", version, "open_clip knows no download for it", hint)
    return path
