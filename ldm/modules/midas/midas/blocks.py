"""Building blocks of the MiDaS networks: the encoders (ViT, ResNeXt-101, EfficientNet-Lite3), the "scratch" 3x3
convs that bring every encoder level to the decoder width, and the RefineNet-style fusion blocks (Lin et al. 2017,
"RefineNet"; Ranftl et al. 2021, "Vision Transformers for Dense Prediction", sec. 3).

Module names and nesting are the original's, so state_dict keys are those of the published weights.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.midas.midas.vit import (
    _make_pretrained_vitb16_384,
    _make_pretrained_vitb_rn50_384,
    _make_pretrained_vitl16_384,
    forward_vit,  # noqa: F401 - the original import path
)

# the channels of the four encoder levels each backbone hands to the decoder
ENCODER_CHANNELS = {
    "vitl16_384": [256, 512, 1024, 1024],
    "vitb_rn50_384": [256, 512, 768, 768],
    "vitb16_384": [96, 192, 384, 768],
    "resnext101_wsl": [256, 512, 1024, 2048],
    "efficientnet_lite3": [32, 48, 136, 384],
}


def _make_encoder(backbone: str, features: int, use_pretrained: bool, groups: int = 1, expand: bool = False,
                  exportable: bool = True, hooks: Sequence[int] | None = None, use_vit_only: bool = False,
                  use_readout: str = "ignore") -> tuple[nn.Module, nn.Module]:
    """(pretrained, scratch): the encoder named `backbone` and the convs mapping its levels to `features` channels.

    `use_pretrained` must be False: weights come from MiDaS files, never from a download."""
    if use_pretrained:
        raise ValueError("MiDaS backbones are built without downloaded weights (use_pretrained=False); load a MiDaS "
                         "weight file through model_path instead")
    if backbone == "vitl16_384":
        pretrained = _make_pretrained_vitl16_384(hooks=hooks, use_readout=use_readout)
    elif backbone == "vitb_rn50_384":
        pretrained = _make_pretrained_vitb_rn50_384(hooks=hooks, use_vit_only=use_vit_only, use_readout=use_readout)
    elif backbone == "vitb16_384":
        pretrained = _make_pretrained_vitb16_384(hooks=hooks, use_readout=use_readout)
    elif backbone == "resnext101_wsl":
        pretrained = _make_pretrained_resnext101_wsl()
    elif backbone == "efficientnet_lite3":
        pretrained = _make_pretrained_efficientnet_lite3(exportable=exportable)
    else:
        raise ValueError(f"MiDaS backbone {backbone!r} is not known; expected one of {sorted(ENCODER_CHANNELS)}")
    return pretrained, _make_scratch(ENCODER_CHANNELS[backbone], features, groups=groups, expand=expand)


def _make_scratch(in_shape: Sequence[int], out_shape: int, groups: int = 1, expand: bool = False) -> nn.Module:
    """layer{1..4}_rn: bias-free 3x3 convs to `out_shape` channels (x1, x2, x4, x8 of it with `expand`)."""
    scratch = nn.Module()
    widths = [out_shape * (2 ** i if expand else 1) for i in range(4)]
    for i, (c_in, c_out) in enumerate(zip(in_shape, widths), start=1):
        setattr(scratch, f"layer{i}_rn", nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1, bias=False,
                                                   groups=groups))
    return scratch


def _make_efficientnet_backbone(effnet: nn.Module) -> nn.Module:
    """EfficientNet stages grouped into four levels at strides 4, 8, 16 and 32.

    timm's `bn1` applies the stem activation itself (BatchNormAct2d); the original's separate `act1` (gen-efficientnet)
    keeps its place as an identity, so the blocks stay at `layer1.3`, `layer1.4` as in the published keys.
    """
    pretrained = nn.Module()
    act1 = getattr(effnet, "act1", nn.Identity())
    pretrained.layer1 = nn.Sequential(effnet.conv_stem, effnet.bn1, act1, *effnet.blocks[0:2])
    pretrained.layer2 = nn.Sequential(*effnet.blocks[2:3])
    pretrained.layer3 = nn.Sequential(*effnet.blocks[3:5])
    pretrained.layer4 = nn.Sequential(*effnet.blocks[5:9])
    return pretrained


def _make_pretrained_efficientnet_lite3(exportable: bool = True) -> nn.Module:
    """timm's tf_efficientnet_lite3 (the network of gen-efficientnet-pytorch), randomly initialised."""
    import timm

    return _make_efficientnet_backbone(timm.create_model("tf_efficientnet_lite3", pretrained=False,
                                                         exportable=exportable))


def _make_resnet_backbone(resnet: nn.Module) -> nn.Module:
    """A torchvision ResNet as four levels: stem + layer1, layer2, layer3, layer4."""
    pretrained = nn.Module()
    pretrained.layer1 = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1)
    pretrained.layer2 = resnet.layer2
    pretrained.layer3 = resnet.layer3
    pretrained.layer4 = resnet.layer4
    return pretrained


def _make_pretrained_resnext101_wsl() -> nn.Module:
    """ResNeXt-101 32x8d (the architecture of the WSL-Images weights MiDaS v2.1 started from), randomly initialised."""
    from torchvision.models import resnext101_32x8d

    return _make_resnet_backbone(resnext101_32x8d(weights=None))


class Interpolate(nn.Module):
    """F.interpolate by a fixed scale factor, as a module."""

    def __init__(self, scale_factor: float, mode: str, align_corners: bool = False) -> None:
        super().__init__()
        self.scale_factor, self.mode, self.align_corners = scale_factor, mode, align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x resized by scale_factor."""
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode, align_corners=self.align_corners)


class ResidualConvUnit(nn.Module):
    """relu(x) + conv(relu(conv(relu(x)))) with 3x3 convs (MidasNet's decoder).

    The residual is relu(x), not x: the original applied an in-place ReLU to its input before adding it back, and the
    published MidasNet weights were trained that way.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The residual unit's output, same shape as x."""
        activated = self.relu(x)
        return self.conv2(self.relu(self.conv1(activated))) + activated


class FeatureFusionBlock(nn.Module):
    """Fuse a decoder path with an encoder level (residual units), then upsample x2 (bilinear, corners aligned)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        """xs = (path,) or (path, skip): resConfUnit2(path + resConfUnit1(skip)) at twice the resolution."""
        output = xs[0]
        if len(xs) == 2:
            output = output + self.resConfUnit1(xs[1])
        output = self.resConfUnit2(output)
        return F.interpolate(output, scale_factor=2, mode="bilinear", align_corners=True)


class ResidualConvUnit_custom(nn.Module):  # noqa: N801 - the original class name
    """ResidualConvUnit with a configurable activation and optional BatchNorm after each conv (DPT, MidasNet_small)."""

    def __init__(self, features: int, activation: nn.Module, bn: bool) -> None:
        super().__init__()
        self.bn = bn
        self.groups = 1
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True, groups=self.groups)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True, groups=self.groups)
        if bn:
            self.bn1 = nn.BatchNorm2d(features)
            self.bn2 = nn.BatchNorm2d(features)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + [bn](conv(act([bn](conv(act(x))))))."""
        out = self.conv1(self.activation(x))
        if self.bn:
            out = self.bn1(out)
        out = self.conv2(self.activation(out))
        if self.bn:
            out = self.bn2(out)
        return out + x


class FeatureFusionBlock_custom(nn.Module):  # noqa: N801 - the original class name
    """FeatureFusionBlock with a 1x1 output conv (halving the channels with `expand`) after the x2 upsampling."""

    def __init__(self, features: int, activation: nn.Module, deconv: bool = False, bn: bool = False,
                 expand: bool = False, align_corners: bool = True) -> None:
        super().__init__()
        if deconv:
            raise ValueError("FeatureFusionBlock_custom: deconv=True is not used by any MiDaS model")
        self.deconv = deconv
        self.align_corners = align_corners
        self.groups = 1
        self.expand = expand
        out_features = features // 2 if expand else features
        self.out_conv = nn.Conv2d(features, out_features, kernel_size=1, stride=1, padding=0, bias=True, groups=1)
        self.resConfUnit1 = ResidualConvUnit_custom(features, activation, bn)
        self.resConfUnit2 = ResidualConvUnit_custom(features, activation, bn)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        """xs = (path,) or (path, skip): out_conv(upsample(resConfUnit2(path + resConfUnit1(skip))))."""
        output = xs[0]
        if len(xs) == 2:
            output = output + self.resConfUnit1(xs[1])
        output = self.resConfUnit2(output)
        output = F.interpolate(output, scale_factor=2, mode="bilinear", align_corners=self.align_corners)
        return self.out_conv(output)
