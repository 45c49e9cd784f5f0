"""MidasNet_small (MiDaS v2.1 small): an EfficientNet-Lite3 encoder and a light decoder whose widths grow x2 per
level (`blocks={'expand': True}`), for fast relative inverse depth."""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
from torch import nn

from ldm.modules.midas.midas.base_model import BaseModel
from ldm.modules.midas.midas.blocks import FeatureFusionBlock_custom, Interpolate, _make_encoder
from ldm.modules.midas.midas.midas_net import encode_and_decode

logger = logging.getLogger(__name__)


class MidasNet_small(BaseModel):  # noqa: N801 - the original class name
    """MiDaS v2.1 small ("midas_v21_small"); forward gives (B, H, W). `path` loads a MiDaS weight file."""

    def __init__(self, path: str | os.PathLike | None = None, features: int = 64,
                 backbone: str = "efficientnet_lite3", non_negative: bool = True, exportable: bool = True,
                 channels_last: bool = False, align_corners: bool = True,
                 blocks: Mapping[str, bool] | None = None) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.blocks = dict({"expand": True} if blocks is None else blocks)
        self.backbone = backbone
        self.groups = 1
        self.expand = bool(self.blocks.get("expand", False))
        widths = [features * (2 ** i if self.expand else 1) for i in range(4)]
        self.pretrained, self.scratch = _make_encoder(self.backbone, features, False, groups=self.groups,
                                                      expand=self.expand, exportable=exportable)
        self.scratch.activation = nn.ReLU(False)
        act = self.scratch.activation
        self.scratch.refinenet4 = FeatureFusionBlock_custom(widths[3], act, bn=False, expand=self.expand,
                                                            align_corners=align_corners)
        self.scratch.refinenet3 = FeatureFusionBlock_custom(widths[2], act, bn=False, expand=self.expand,
                                                            align_corners=align_corners)
        self.scratch.refinenet2 = FeatureFusionBlock_custom(widths[1], act, bn=False, expand=self.expand,
                                                            align_corners=align_corners)
        self.scratch.refinenet1 = FeatureFusionBlock_custom(widths[0], act, bn=False, align_corners=align_corners)
        self.scratch.output_conv = nn.Sequential(
            nn.Conv2d(features, features // 2, kernel_size=3, stride=1, padding=1, groups=self.groups),
            Interpolate(scale_factor=2, mode="bilinear"),
            nn.Conv2d(features // 2, 32, kernel_size=3, stride=1, padding=1),
            act,
            nn.Conv2d(32, 1, kernel_size=1, stride=1, padding=0),
            nn.ReLU(True) if non_negative else nn.Identity(),
            nn.Identity(),
        )
        if path:
            self.load(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse depth (B, H, W) of images x (B, 3, H, W), H and W divisible by 32."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return encode_and_decode(self, x)
