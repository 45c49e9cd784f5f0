"""The state_dict layouts of the published MiDaS weight files, enumerated from the architectures alone.

DPT (Ranftl et al. 2021): a timm ViT at `pretrained.model` (its 1000-class ImageNet head included: the published
files hold it; DPT-Hybrid's ResNet-50 v2 stem with stages of 3, 4, 9 bottlenecks at `patch_embed.backbone`), the
reassemble layers `pretrained.act_postprocess{1..4}` (Sequential indices 0 readout projection, 3 1x1 conv, 4 resampling),
and the decoder at `scratch`. MidasNet: torchvision-layout ResNeXt-101 32x8d; MidasNet_small: EfficientNet-Lite3.
"""
from __future__ import annotations

import math

Layout = dict[str, tuple[int, ...]]


def affine(prefix: str, c: int) -> Layout:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


def batchnorm(prefix: str, c: int) -> Layout:
    return {**affine(prefix, c), f"{prefix}.running_mean": (c,), f"{prefix}.running_var": (c,),
            f"{prefix}.num_batches_tracked": ()}


def conv(prefix: str, c_in: int, c_out: int, k: int, bias: bool = True, groups: int = 1) -> Layout:
    keys = {f"{prefix}.weight": (c_out, c_in // groups, k, k)}
    return {**keys, f"{prefix}.bias": (c_out,)} if bias else keys


def linear(prefix: str, c_in: int, c_out: int) -> Layout:
    return {f"{prefix}.weight": (c_out, c_in), f"{prefix}.bias": (c_out,)}


# ---------------------------------------------------------------- encoders
def vit(prefix: str, depth: int, dim: int, patch_in: int, patch_k: int, grid: int = 24) -> Layout:
    """A timm VisionTransformer: tokens, patch projection, `depth` pre-norm blocks (MLP ratio 4), norm, head."""
    keys = {f"{prefix}.cls_token": (1, 1, dim), f"{prefix}.pos_embed": (1, 1 + grid * grid, dim)}
    keys |= conv(f"{prefix}.patch_embed.proj", patch_in, dim, patch_k)
    for i in range(depth):
        b = f"{prefix}.blocks.{i}"
        keys |= {**affine(f"{b}.norm1", dim), **linear(f"{b}.attn.qkv", dim, 3 * dim),
                 **linear(f"{b}.attn.proj", dim, dim), **affine(f"{b}.norm2", dim),
                 **linear(f"{b}.mlp.fc1", dim, 4 * dim), **linear(f"{b}.mlp.fc2", 4 * dim, dim)}
    return {**keys, **affine(f"{prefix}.norm", dim), **linear(f"{prefix}.head", dim, 1000)}


def resnetv2_stem(prefix: str, layers=(3, 4, 9)) -> Layout:
    """ResNet-v2 (non pre-activation) with weight-standardised bias-free convs and GroupNorm, widths 256 x 2^s."""
    keys = {**conv(f"{prefix}.stem.conv", 3, 64, 7, bias=False), **affine(f"{prefix}.stem.norm", 64)}
    c_in = 64
    for s, n in enumerate(layers):
        out, mid = 256 * 2 ** s, 64 * 2 ** s
        for b in range(n):
            p = f"{prefix}.stages.{s}.blocks.{b}"
            if b == 0:
                keys |= {**conv(f"{p}.downsample.conv", c_in, out, 1, bias=False), **affine(f"{p}.downsample.norm", out)}
            keys |= {**conv(f"{p}.conv1", c_in, mid, 1, bias=False), **affine(f"{p}.norm1", mid),
                     **conv(f"{p}.conv2", mid, mid, 3, bias=False), **affine(f"{p}.norm2", mid),
                     **conv(f"{p}.conv3", mid, out, 1, bias=False), **affine(f"{p}.norm3", out)}
            c_in = out
    return keys


def reassemble(level: int, dim: int, features: int, readout: bool) -> Layout:
    """act_postprocess{level}: readout projection, 1x1 conv, then x4 / x2 transposed conv or /2 conv."""
    p = f"pretrained.act_postprocess{level}"
    keys = linear(f"{p}.0.project.0", 2 * dim, dim) if readout else {}
    keys |= conv(f"{p}.3", dim, features, 1)
    if level in (1, 2):  # ConvTranspose2d weights are (in, out, k, k)
        k = 4 if level == 1 else 2
        keys |= {f"{p}.4.weight": (features, features, k, k), f"{p}.4.bias": (features,)}
    elif level == 4:
        keys |= conv(f"{p}.4", features, features, 3)
    return keys


def resnext101_32x8d(prefix: str) -> Layout:
    """torchvision's ResNeXt-101 32x8d as MiDaS groups it: layer1 = (conv1, bn1, relu, maxpool, layer1)."""
    keys = {**conv(f"{prefix}.layer1.0", 3, 64, 7, bias=False), **batchnorm(f"{prefix}.layer1.1", 64)}
    c_in = 64
    for s, n in enumerate((3, 4, 23, 3)):
        width, out = 256 * 2 ** s, 256 * 2 ** s  # planes * (8 / 64) * 32 groups; expansion 4
        stage = f"{prefix}.layer1.4" if s == 0 else f"{prefix}.layer{s + 1}"
        for b in range(n):
            p = f"{stage}.{b}"
            keys |= {**conv(f"{p}.conv1", c_in, width, 1, bias=False), **batchnorm(f"{p}.bn1", width),
                     **conv(f"{p}.conv2", width, width, 3, bias=False, groups=32), **batchnorm(f"{p}.bn2", width),
                     **conv(f"{p}.conv3", width, out, 1, bias=False), **batchnorm(f"{p}.bn3", out)}
            if b == 0:
                keys |= {**conv(f"{p}.downsample.0", c_in, out, 1, bias=False), **batchnorm(f"{p}.downsample.1", out)}
            c_in = out
    return keys


def make_divisible(v: float, divisor: int = 8) -> int:
    """EfficientNet's channel rounding: the nearest multiple of 8, never below 90% of v."""
    rounded = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * v else rounded


# EfficientNet-B0 stages (Tan & Le 2019, table 1): (block, repeats, kernel, stride, expansion, channels)
B0_STAGES = [("ds", 1, 3, 1, 1, 16), ("ir", 2, 3, 2, 6, 24), ("ir", 2, 5, 2, 6, 40), ("ir", 3, 3, 2, 6, 80),
             ("ir", 3, 5, 1, 6, 112), ("ir", 4, 5, 2, 6, 192), ("ir", 1, 3, 1, 6, 320)]


def efficientnet_lite3(prefix: str) -> Layout:
    """EfficientNet-Lite3 (width 1.2, depth 1.4; lite: 32-channel stem, first and last stage repeats unscaled, no SE)
    grouped as MiDaS does: layer1 = stem conv, bn, act, stages 0-1; layer2 = stage 2; layer3 = 3-4; layer4 = 5-6."""
    keys = {**conv(f"{prefix}.layer1.0", 3, 32, 3, bias=False), **batchnorm(f"{prefix}.layer1.1", 32)}
    slots = {0: ("layer1", 3), 1: ("layer1", 4), 2: ("layer2", 0), 3: ("layer3", 0), 4: ("layer3", 1),
             5: ("layer4", 0), 6: ("layer4", 1)}
    c_in = 32
    for s, (kind, repeats, k, _, e, c) in enumerate(B0_STAGES):
        out = make_divisible(c * 1.2)
        repeats = repeats if s in (0, len(B0_STAGES) - 1) else math.ceil(repeats * 1.4)
        layer, index = slots[s]
        for b in range(repeats):
            p = f"{prefix}.{layer}.{index}.{b}"
            if kind == "ds":
                keys |= {**conv(f"{p}.conv_dw", c_in, c_in, k, bias=False, groups=c_in), **batchnorm(f"{p}.bn1", c_in),
                         **conv(f"{p}.conv_pw", c_in, out, 1, bias=False), **batchnorm(f"{p}.bn2", out)}
            else:
                mid = c_in * e
                keys |= {**conv(f"{p}.conv_pw", c_in, mid, 1, bias=False), **batchnorm(f"{p}.bn1", mid),
                         **conv(f"{p}.conv_dw", mid, mid, k, bias=False, groups=mid), **batchnorm(f"{p}.bn2", mid),
                         **conv(f"{p}.conv_pwl", mid, out, 1, bias=False), **batchnorm(f"{p}.bn3", out)}
            c_in = out
    return keys


# ---------------------------------------------------------------- decoders
def scratch(in_channels, widths) -> Layout:
    keys = {}
    for i, (c_in, c_out) in enumerate(zip(in_channels, widths), start=1):
        keys |= conv(f"scratch.layer{i}_rn", c_in, c_out, 3, bias=False)
    return keys


def fusion(prefix: str, c: int, out_conv: int | None) -> Layout:
    keys = {}
    for unit in ("resConfUnit1", "resConfUnit2"):
        keys |= {**conv(f"{prefix}.{unit}.conv1", c, c, 3), **conv(f"{prefix}.{unit}.conv2", c, c, 3)}
    return keys | (conv(f"{prefix}.out_conv", c, out_conv, 1) if out_conv else {})


def head(features: int, mid: int) -> Layout:
    return {**conv("scratch.output_conv.0", features, mid, 3), **conv("scratch.output_conv.2", mid, 32, 3),
            **conv("scratch.output_conv.4", 32, 1, 1)}


def dpt(backbone: str) -> Layout:
    """DPTDepthModel: ViT encoder, reassembly to [256, 512, D, D] (D the ViT width), 256-wide fusion, depth head."""
    if backbone == "vitb_rn50_384":
        dim = 768
        keys = vit("pretrained.model", 12, dim, patch_in=1024, patch_k=1)
        keys |= resnetv2_stem("pretrained.model.patch_embed.backbone")
        levels = (3, 4)  # levels 1-2 come from the ResNet stages unchanged
    else:
        dim = 1024
        keys = vit("pretrained.model", 24, dim, patch_in=3, patch_k=16)
        levels = (1, 2, 3, 4)
    channels = [256, 512, dim, dim]
    for level in levels:
        keys |= reassemble(level, dim, channels[level - 1], readout=True)
    keys |= scratch(channels, [256] * 4)
    for i in range(1, 5):
        keys |= fusion(f"scratch.refinenet{i}", 256, out_conv=256)
    return keys | head(256, 128)


def midas_v21() -> Layout:
    keys = {**resnext101_32x8d("pretrained"), **scratch([256, 512, 1024, 2048], [256] * 4)}
    for i in range(1, 5):
        keys |= fusion(f"scratch.refinenet{i}", 256, out_conv=None)
    return keys | head(256, 128)


def midas_v21_small() -> Layout:
    widths = [64, 128, 256, 512]  # features 64, expanded x2 per level
    keys = {**efficientnet_lite3("pretrained"), **scratch([32, 48, 136, 384], widths)}
    for i, c in enumerate(widths, start=1):
        keys |= fusion(f"scratch.refinenet{i}", c, out_conv=c // 2 if i > 1 else c)
    return keys | head(64, 32)


EXPECTED = {"dpt_hybrid": lambda: dpt("vitb_rn50_384"), "dpt_large": lambda: dpt("vitl16_384"),
            "midas_v21": midas_v21, "midas_v21_small": midas_v21_small}
