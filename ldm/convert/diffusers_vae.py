"""Convert first-stage (KL autoencoder) weights between the original layout and diffusers' `AutoencoderKL`.

Our keys follow CompVis/latent-diffusion (`encoder.down.0.block.0.norm1.weight`, `decoder.up.3.upsample.conv.weight`,
`encoder.mid.attn_1.q.weight`); diffusers names the same tensors `encoder.down_blocks.0.resnets.0.norm1.weight`,
`decoder.up_blocks.0.upsamplers.0.conv.weight`, `encoder.mid_block.attentions.0.to_q.weight`. Two differences
are more than names: diffusers stores the decoder levels lowest resolution first (our `up[i]` is its
`up_blocks[L-1-i]`), and its attention projections are Linear layers where ours are 1x1 convolutions.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

# (ours, diffusers) key patterns; `{lvl}`/`{idx}` are level/index numbers, `{rest}` the remaining dotted path.
_MODULE_RULES: list[tuple[str, str]] = [
    ("encoder.down.{lvl}.block.{idx}.{rest}", "encoder.down_blocks.{lvl}.resnets.{idx}.{rest}"),
    ("encoder.down.{lvl}.attn.{idx}.{rest}", "encoder.down_blocks.{lvl}.attentions.{idx}.{rest}"),
    ("encoder.down.{lvl}.downsample.conv.{rest}", "encoder.down_blocks.{lvl}.downsamplers.0.conv.{rest}"),
    ("decoder.up.{lvl}.block.{idx}.{rest}", "decoder.up_blocks.{lvl}.resnets.{idx}.{rest}"),
    ("decoder.up.{lvl}.attn.{idx}.{rest}", "decoder.up_blocks.{lvl}.attentions.{idx}.{rest}"),
    ("decoder.up.{lvl}.upsample.conv.{rest}", "decoder.up_blocks.{lvl}.upsamplers.0.conv.{rest}"),
    ("{coder}.mid.block_1.{rest}", "{coder}.mid_block.resnets.0.{rest}"),
    ("{coder}.mid.block_2.{rest}", "{coder}.mid_block.resnets.1.{rest}"),
    ("{coder}.mid.attn_1.{rest}", "{coder}.mid_block.attentions.0.{rest}"),
    ("{coder}.norm_out.{rest}", "{coder}.conv_norm_out.{rest}"),
    ("{coder}.conv_in.{rest}", "{coder}.conv_in.{rest}"),
    ("{coder}.conv_out.{rest}", "{coder}.conv_out.{rest}"),
    ("quant_conv.{rest}", "quant_conv.{rest}"),
    ("post_quant_conv.{rest}", "post_quant_conv.{rest}"),
]
# Layer renames inside a residual block and inside an attention block: (ours, diffusers).
_RESNET_LAYERS = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                  ("nin_shortcut", "conv_shortcut")]
_ATTN_LAYERS = [("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]
# Attention names of diffusers checkpoints saved before its attention refactor, accepted when reading.
_LEGACY_DIFFUSERS_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_PARAMS = ("weight", "bias")
# Keys of our autoencoder that have no diffusers counterpart and are dropped (the training loss).
_TRAINING_ONLY_PREFIXES = ("loss.",)

_FIELD = {"lvl": r"(?P<lvl>\d+)", "idx": r"(?P<idx>\d+)", "coder": r"(?P<coder>encoder|decoder)", "rest": r"(?P<rest>.+)"}


def _compile(template: str) -> re.Pattern[str]:
    """Regex for a `{field}` key template."""
    parts = re.split(r"(\{\w+\})", template)
    return re.compile("".join(_FIELD[p[1:-1]] if p.startswith("{") else re.escape(p) for p in parts) + "$")


def _inner_map(outer: str, forward: bool) -> dict[str, str]:
    """Layer-name map (source → target) inside the block that the outer template names; {} for plain layers."""
    if "{idx}" not in outer and ".mid" not in outer:
        return {}
    is_attn = "attn" in outer or "attentions" in outer
    pairs = _ATTN_LAYERS if is_attn else _RESNET_LAYERS
    if not forward:
        pairs = [(theirs, ours) for ours, theirs in pairs]
    mapping = {f"{src}.{p}": f"{dst}.{p}" for src, dst in pairs for p in _PARAMS}
    if is_attn and not forward:
        for old, new in _LEGACY_DIFFUSERS_ATTN.items():
            mapping.update({f"{old}.{p}": mapping[f"{new}.{p}"] for p in _PARAMS})
    return mapping


def _num_levels(sd: Mapping[str, Any], pattern: str) -> int:
    """Number of decoder levels, from the largest level index among keys matching `pattern`."""
    regex = re.compile(pattern)
    levels = [int(m.group(1)) for key in sd if (m := regex.match(key))]
    return max(levels) + 1 if levels else 0


def _convert(sd: Mapping[str, torch.Tensor], forward: bool) -> dict[str, torch.Tensor]:
    """Rename every key of `sd` (ours → diffusers when `forward`), flipping decoder levels and reshaping attention."""
    n_up = _num_levels(sd, r"decoder\.up\.(\d+)\." if forward else r"decoder\.up_blocks\.(\d+)\.")
    rules = [(_compile(src), dst, _inner_map(src, forward), "decoder.up" in src)
             for ours, theirs in _MODULE_RULES for src, dst in [(ours, theirs) if forward else (theirs, ours)]]
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if forward and key.startswith(_TRAINING_ONLY_PREFIXES):
            logger.info("dropping training-only key %s (no diffusers counterpart)", key)
            continue
        new_key = _rename(key, rules, n_up)
        if new_key is None:
            unknown.append(key)
            continue
        out[new_key] = _reshape_attention(new_key, value, forward)
    if unknown:
        direction = "our (CompVis) layout" if forward else "diffusers' AutoencoderKL layout"
        raise ValueError(f"{len(unknown)} keys are not part of {direction}: {', '.join(unknown[:8])}"
                       + (" ..." if len(unknown) > 8 else ""))
    return out


def _rename(key: str, rules: list[tuple[re.Pattern[str], str, dict[str, str], bool]], n_up: int) -> str | None:
    """The converted name of one key, or None when no rule covers it."""
    for regex, target, inner, flips_level in rules:
        match = regex.match(key)
        if match is None:
            continue
        fields = match.groupdict()
        if inner:
            if fields["rest"] not in inner:
                return None
            fields["rest"] = inner[fields["rest"]]
        elif fields["rest"] not in _PARAMS:
            return None
        if flips_level:
            fields["lvl"] = str(n_up - 1 - int(fields["lvl"]))
        return target.format(**fields)
    return None


def _reshape_attention(key: str, value: torch.Tensor, forward: bool) -> torch.Tensor:
    """Attention projection weights: our (C, C, 1, 1) convs ↔ diffusers' (C, C) linears."""
    is_projection = re.search(r"(\.(q|k|v|proj_out)|\.(to_q|to_k|to_v|to_out\.0))\.weight$", key)
    if is_projection is None:
        return value
    if forward:
        return value.reshape(value.shape[0], value.shape[1]) if value.ndim == 4 else value
    return value.reshape(*value.shape, 1, 1) if value.ndim == 2 else value


def vae_state_dict_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our AutoencoderKL state dict (encoder/decoder/quant_conv/post_quant_conv keys) → diffusers' AutoencoderKL one."""
    return _convert(sd, forward=True)


def vae_state_dict_from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers' AutoencoderKL state dict → ours (the original latent-diffusion layout)."""
    return _convert(sd, forward=False)


def _check_convertible(ddconfig: Mapping[str, Any], embed_dim: int) -> None:
    """Raise when `ddconfig` describes an autoencoder diffusers' AutoencoderKL cannot express."""
    problems = []
    if embed_dim != ddconfig["z_channels"]:
        problems.append(f"embed_dim ({embed_dim}) must equal ddconfig.z_channels ({ddconfig['z_channels']})")
    if ddconfig["ch_mult"][0] != 1:
        problems.append(f"ddconfig.ch_mult must start with 1, got {list(ddconfig['ch_mult'])}")
    if not ddconfig.get("double_z", True):
        problems.append("ddconfig.double_z must be true (a KL autoencoder)")
    if not ddconfig.get("resamp_with_conv", True):
        problems.append("ddconfig.resamp_with_conv must be true")
    if ddconfig.get("use_linear_attn", False) or ddconfig.get("attn_type", "vanilla") == "linear":
        problems.append("linear attention (ddconfig.use_linear_attn / attn_type 'linear') has no diffusers counterpart")
    for flag in ("give_pre_end", "tanh_out"):
        if ddconfig.get(flag, False):
            problems.append(f"ddconfig.{flag} must be false")
    if problems:
        raise ValueError("cannot express this autoencoder as diffusers.AutoencoderKL: " + "; ".join(problems))


def diffusers_vae_config(ddconfig: Mapping[str, Any], embed_dim: int) -> dict[str, Any]:
    """Keyword arguments for `diffusers.AutoencoderKL` equivalent to our `ddconfig` and `embed_dim`."""
    _check_convertible(ddconfig, embed_dim)
    ch, ch_mult, resolution = ddconfig["ch"], list(ddconfig["ch_mult"]), ddconfig["resolution"]
    attn_resolutions = list(ddconfig.get("attn_resolutions", []))
    levels = range(len(ch_mult))
    attn_levels = {i for i in levels if resolution // 2**i in attn_resolutions}
    return {
        "in_channels": ddconfig["in_channels"],
        "out_channels": ddconfig["out_ch"],
        "down_block_types": [("AttnDownEncoderBlock2D" if i in attn_levels else "DownEncoderBlock2D") for i in levels],
        "up_block_types": [("AttnUpDecoderBlock2D" if i in attn_levels else "UpDecoderBlock2D") for i in reversed(levels)],
        "block_out_channels": [ch * m for m in ch_mult],
        "layers_per_block": ddconfig["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": ddconfig["z_channels"],
        "norm_num_groups": 32,
        "sample_size": resolution,
        "mid_block_add_attention": ddconfig.get("attn_type", "vanilla") != "none",
    }
