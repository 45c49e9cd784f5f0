"""Convert the latent-diffusion UNet (`UNetModel`) to and from diffusers' `UNet2DConditionModel`.

`diffusers_unet_config` turns the original UNet constructor parameters into the diffusers constructor
keyword arguments; `unet_state_dict_to_diffusers` / `unet_state_dict_from_diffusers` rename the
state_dict keys between the two layouts (the tensors are shared, never copied or reshaped: both sides
use the same conv / linear shapes once `use_linear_projection` mirrors `use_linear_in_transformer`).

Only Stable-Diffusion-like UNets have a diffusers twin: spatial transformers everywhere attention is
used, strided-conv resampling, 2-D. Anything else raises `UnsupportedUNetConfig` naming the parameter.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

# The original UNetModel defaults for every parameter the conversion reads.
_DEFAULTS: dict[str, Any] = {
    "image_size": None,
    "dropout": 0.0,
    "channel_mult": (1, 2, 4, 8),
    "conv_resample": True,
    "dims": 2,
    "num_classes": None,
    "num_heads": -1,
    "num_head_channels": -1,
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "use_spatial_transformer": False,
    "transformer_depth": 1,
    "context_dim": None,
    "n_embed": None,
    "legacy": True,
    "disable_self_attentions": None,
    "num_attention_blocks": None,
    "disable_middle_self_attn": False,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
}
_REQUIRED = ("in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions")

# ResBlock sub-module names: ours (the original's) -> diffusers' ResnetBlock2D.
_RESNET_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


class UnsupportedUNetConfig(ValueError):
    """A UNetModel configuration that diffusers' UNet2DConditionModel cannot express."""


@dataclass(frozen=True)
class _Layout:
    """The facts about a UNet configuration that decide both the diffusers config and the key mapping."""

    levels: int
    num_res_blocks: list[int]
    attention: list[bool]  # per level: does every res block at this level carry a SpatialTransformer
    heads: list[int]  # per level: attention heads
    depth: list[int]  # per level: transformer depth
    num_classes: int | str | None


def _per_level(value: Any, levels: int, name: str) -> list:
    """An int broadcast to one entry per level, or a sequence checked to have one entry per level."""
    if isinstance(value, (int, bool)):
        return [value] * levels
    values = list(value)
    if len(values) != levels:
        raise UnsupportedUNetConfig(
            f"UNet parameter {name}={values} needs one entry per level of channel_mult ({levels})"
        )
    return values


def _unsupported(name: str, value: Any, why: str) -> UnsupportedUNetConfig:
    """An error naming the UNet parameter that diffusers cannot express."""
    return UnsupportedUNetConfig(
        f"UNet parameter {name}={value!r} has no diffusers UNet2DConditionModel equivalent: {why}"
    )


def _params(unet_params: Mapping[str, Any]) -> dict[str, Any]:
    """The given parameters over the original defaults, with the required ones checked."""
    missing = [k for k in _REQUIRED if k not in unet_params]
    if missing:
        raise UnsupportedUNetConfig(f"UNet parameters are missing required keys {missing}")
    return {**_DEFAULTS, **dict(unet_params)}


def _check_expressible(p: dict[str, Any]) -> None:
    """Raise for the parts of the original UNet that diffusers' UNet2DConditionModel has no counterpart for."""
    if not p["use_spatial_transformer"]:
        raise _unsupported("use_spatial_transformer", False, "legacy AttentionBlock self-attention is not supported")
    if p["dims"] != 2:
        raise _unsupported("dims", p["dims"], "only 2-D UNets exist in diffusers")
    if not p["conv_resample"]:
        raise _unsupported("conv_resample", False, "diffusers always resamples with a strided / upsampling conv")
    if p["resblock_updown"]:
        raise _unsupported("resblock_updown", True, "cross-attention blocks resample with Downsample2D/Upsample2D only")
    if p["n_embed"] is not None:
        raise _unsupported("n_embed", p["n_embed"], "there is no codebook-id prediction head")
    if p["disable_middle_self_attn"]:
        raise _unsupported("disable_middle_self_attn", True, "UNetMidBlock2DCrossAttn always self-attends")
    if p["num_classes"] is not None and not isinstance(p["num_classes"], int) and p["num_classes"] != "sequential":
        raise _unsupported(
            "num_classes", p["num_classes"], "only int classes and 'sequential' ADM vectors are supported"
        )
    if p["num_classes"] == "sequential" and p["adm_in_channels"] is None:
        raise UnsupportedUNetConfig("UNet parameter num_classes='sequential' needs adm_in_channels")
    if p["context_dim"] is None:
        raise UnsupportedUNetConfig("UNet parameter context_dim is required with use_spatial_transformer=True")


def _heads(ch: int, p: dict[str, Any]) -> int:
    """Attention heads at width `ch`, derived as the original does."""
    if p["num_head_channels"] == -1:
        if p["num_heads"] <= 0:
            raise UnsupportedUNetConfig("UNet parameters: set num_heads or num_head_channels (both are -1)")
        return p["num_heads"]
    if ch % p["num_head_channels"]:
        raise _unsupported(
            "num_head_channels", p["num_head_channels"], f"it does not divide the width {ch} of a level"
        )
    return ch // p["num_head_channels"]


def _layout(unet_params: Mapping[str, Any]) -> tuple[dict[str, Any], _Layout]:
    """Validate the parameters and derive the per-level layout."""
    p = _params(unet_params)
    _check_expressible(p)
    levels = len(p["channel_mult"])
    num_res_blocks = _per_level(p["num_res_blocks"], levels, "num_res_blocks")
    attention = [2**level in p["attention_resolutions"] for level in range(levels)]
    if p["num_attention_blocks"] is not None:
        counts = _per_level(p["num_attention_blocks"], levels, "num_attention_blocks")
        # The original never attends in an up level's extra (num_res_blocks + 1)-th block once counts are given,
        # so only a count of 0 (no attention at that level) matches a diffusers block.
        if any(a and c for a, c in zip(attention, counts)):
            raise _unsupported(
                "num_attention_blocks", counts, "diffusers attends after every res block of a cross-attention level"
            )
        attention = [False] * levels
    widths = [p["model_channels"] * m for m in p["channel_mult"]]
    heads = [_heads(ch, p) for ch in widths]
    depth = _per_level(p["transformer_depth"], levels, "transformer_depth")
    return p, _Layout(levels, num_res_blocks, attention, heads, depth, p["num_classes"])


def _one_or_tuple(values: Sequence[Any]) -> Any:
    """A single value when all entries agree, else a tuple (the diffusers convention)."""
    return values[0] if len(set(values)) == 1 else tuple(values)


def _context_dim(value: Any) -> int:
    """The cross-attention width; a per-block list is accepted only when all entries agree."""
    if isinstance(value, int):
        return value
    values = list(value)
    if len(set(values)) != 1:
        raise _unsupported("context_dim", values, "per-transformer-block context widths differ")
    return values[0]


def diffusers_unet_config(unet_params: Mapping[str, Any]) -> dict[str, Any]:
    """The `diffusers.UNet2DConditionModel` constructor kwargs equivalent to these `UNetModel` params."""
    p, lay = _layout(unet_params)
    config: dict[str, Any] = {
        "sample_size": p["image_size"],
        "in_channels": p["in_channels"],
        "out_channels": p["out_channels"],
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in lay.attention),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(lay.attention)),
        "block_out_channels": tuple(p["model_channels"] * m for m in p["channel_mult"]),
        "layers_per_block": _one_or_tuple(lay.num_res_blocks),
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "dropout": float(p["dropout"]),
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": _context_dim(p["context_dim"]),
        "transformer_layers_per_block": _one_or_tuple(lay.depth),
        # diffusers' `attention_head_dim` is read as the number of heads (its documented naming quirk)
        "attention_head_dim": _one_or_tuple(lay.heads),
        "use_linear_projection": bool(p["use_linear_in_transformer"]),
        "upcast_attention": False,
        "resnet_time_scale_shift": "scale_shift" if p["use_scale_shift_norm"] else "default",
    }
    disabled = p["disable_self_attentions"]
    if disabled is not None and any(disabled):
        per_level = _per_level(disabled, lay.levels, "disable_self_attentions")
        config["only_cross_attention"] = tuple(bool(d) for d in per_level)
    if isinstance(lay.num_classes, int):
        config["num_class_embeds"] = lay.num_classes
    elif lay.num_classes == "sequential":
        config["class_embed_type"] = "projection"
        config["projection_class_embeddings_input_dim"] = p["adm_in_channels"]
    return config


def _prefix_pairs(lay: _Layout) -> list[tuple[str, str, bool]]:
    """(our prefix, diffusers prefix, is a res block) for every sub-module of the UNet."""
    pairs: list[tuple[str, str, bool]] = [
        ("time_embed.0", "time_embedding.linear_1", False),
        ("time_embed.2", "time_embedding.linear_2", False),
        ("input_blocks.0.0", "conv_in", False),
        ("out.0", "conv_norm_out", False),
        ("out.2", "conv_out", False),
    ]
    if isinstance(lay.num_classes, int):
        pairs.append(("label_emb", "class_embedding", False))
    elif lay.num_classes == "sequential":
        pairs += [
            ("label_emb.0.0", "class_embedding.linear_1", False),
            ("label_emb.0.2", "class_embedding.linear_2", False),
        ]

    n = 1
    for level in range(lay.levels):
        for j in range(lay.num_res_blocks[level]):
            pairs.append((f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}", True))
            if lay.attention[level]:
                pairs.append((f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}", False))
            n += 1
        if level != lay.levels - 1:
            pairs.append((f"input_blocks.{n}.0.op", f"down_blocks.{level}.downsamplers.0.conv", False))
            n += 1

    pairs += [
        ("middle_block.0", "mid_block.resnets.0", True),
        ("middle_block.1", "mid_block.attentions.0", False),
        ("middle_block.2", "mid_block.resnets.1", True),
    ]

    n = 0
    for up, level in enumerate(reversed(range(lay.levels))):
        for j in range(lay.num_res_blocks[level] + 1):
            pairs.append((f"output_blocks.{n}.0", f"up_blocks.{up}.resnets.{j}", True))
            if lay.attention[level]:
                pairs.append((f"output_blocks.{n}.1", f"up_blocks.{up}.attentions.{j}", False))
            if level and j == lay.num_res_blocks[level]:
                slot = 2 if lay.attention[level] else 1
                pairs.append((f"output_blocks.{n}.{slot}.conv", f"up_blocks.{up}.upsamplers.0.conv", False))
            n += 1
    return pairs


def _split_prefix(key: str, prefixes: Mapping[str, Any]) -> tuple[str, str] | None:
    """Split `key` into the longest module prefix in `prefixes` and the rest, or None if none matches."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in prefixes:
            return head, ".".join(parts[cut:])
    return None


def _rename(
    sd: Mapping[str, torch.Tensor], table: Mapping[str, tuple[str, bool]], parts: Mapping[str, str], source: str
) -> dict[str, torch.Tensor]:
    """Rename every key of `sd` through the prefix table (and res-block part names); unknown keys raise."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        split = _split_prefix(key, table)
        if split is None:
            raise KeyError(f"{source} UNet state_dict key {key!r} does not belong to this UNet configuration")
        head, rest = split
        target, is_resnet = table[head]
        if is_resnet:
            part = _split_prefix(rest, parts)
            if part is None:
                raise KeyError(f"{source} UNet state_dict key {key!r}: unknown res-block parameter {rest!r}")
            rest = f"{parts[part[0]]}.{part[1]}"
        out[f"{target}.{rest}"] = value
    return out


def unet_state_dict_to_diffusers(
    sd: Mapping[str, torch.Tensor], unet_params: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Rename our UNetModel state_dict (no `model.diffusion_model.` prefix) to UNet2DConditionModel keys."""
    _, lay = _layout(unet_params)
    table = {ours: (theirs, res) for ours, theirs, res in _prefix_pairs(lay)}
    return _rename(sd, table, _RESNET_PARTS, "our")


def unet_state_dict_from_diffusers(
    sd: Mapping[str, torch.Tensor], unet_params: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Rename a UNet2DConditionModel state_dict to our UNetModel keys (the exact inverse of the above)."""
    _, lay = _layout(unet_params)
    table = {theirs: (ours, res) for ours, theirs, res in _prefix_pairs(lay)}
    return _rename(sd, table, {v: k for k, v in _RESNET_PARTS.items()}, "diffusers")
