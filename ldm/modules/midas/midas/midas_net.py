"""MidasNet (Ranftl et al. 2020, "Towards Robust Monocular Depth Estimation", MiDaS v2.1): a ResNeXt-101 32x8d
encoder and a RefineNet-style decoder predicting relative inverse depth."""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

from ldm.modules.midas.midas.base_model import BaseModel
from ldm.modules.midas.midas.blocks import FeatureFusionBlock, Interpolate, _make_encoder

logger = logging.getLogger(__name__)


class MidasNet(BaseModel):
    """MiDaS v2.1 ("midas_v21"); forward gives (B, H, W). `path` loads a MiDaS weight file (None: random weights)."""

    def __init__(self, path: str | os.PathLike | None = None, features: int = 256, non_negative: bool = True) -> None:
        super().__init__()
        self.pretrained, self.scratch = _make_encoder(backbone="resnext101_wsl", features=features,
                                                      use_pretrained=False)
        self.scratch.refinenet4 = FeatureFusionBlock(features)
        self.scratch.refinenet3 = FeatureFusionBlock(features)
        self.scratch.refinenet2 = FeatureFusionBlock(features)
        self.scratch.refinenet1 = FeatureFusionBlock(features)
        self.scratch.output_conv = nn.Sequential(
            nn.Conv2d(features, 128, kernel_size=3, stride=1, padding=1),
            Interpolate(scale_factor=2, mode="bilinear"),
            nn.Conv2d(128, 32, kernel_size=3, stride=1, padding=1),
            nn.ReLU(True),
            nn.Conv2d(32, 1, kernel_size=1, stride=1, padding=0),
            nn.ReLU(True) if non_negative else nn.Identity(),
        )
        if path:
            self.load(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse depth (B, H, W) of images x (B, 3, H, W), H and W divisible by 32."""
        return encode_and_decode(self, x)


def encode_and_decode(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The CNN MiDaS forward: four encoder levels, scratch convs, fusion from coarse to fine, head; (B, H, W)."""
    if x.shape[-1] % 32 or x.shape[-2] % 32:
        raise ValueError(f"{type(net).__name__} needs an input height and width divisible by 32, got "
                         f"{tuple(x.shape[-2:])}")
    layer_1 = net.pretrained.layer1(x)
    layer_2 = net.pretrained.layer2(layer_1)
    layer_3 = net.pretrained.layer3(layer_2)
    layer_4 = net.pretrained.layer4(layer_3)
    path_4 = net.scratch.refinenet4(net.scratch.layer4_rn(layer_4))
    path_3 = net.scratch.refinenet3(path_4, net.scratch.layer3_rn(layer_3))
    path_2 = net.scratch.refinenet2(path_3, net.scratch.layer2_rn(layer_2))
    path_1 = net.scratch.refinenet1(path_2, net.scratch.layer1_rn(layer_1))
    return torch.squeeze(net.scratch.output_conv(path_1), dim=1)
