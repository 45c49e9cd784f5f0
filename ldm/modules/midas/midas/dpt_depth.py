"""DPT (Ranftl et al. 2021, "Vision Transformers for Dense Prediction"): a ViT encoder reassembled into four feature
maps, fused coarse to fine by RefineNet-style blocks, and a depth head; DPTDepthModel predicts relative inverse depth
(MiDaS 3.0: DPT-Hybrid `backbone="vitb_rn50_384"`, DPT-Large `backbone="vitl16_384"`)."""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

from ldm.modules.midas.midas.base_model import BaseModel
from ldm.modules.midas.midas.blocks import FeatureFusionBlock_custom, Interpolate, _make_encoder

logger = logging.getLogger(__name__)

# the ViT blocks each backbone is read out after
HOOKS = {"vitb_rn50_384": [0, 1, 8, 11], "vitb16_384": [2, 5, 8, 11], "vitl16_384": [5, 11, 17, 23]}


def _make_fusion_block(features: int, use_bn: bool) -> FeatureFusionBlock_custom:
    """A DPT fusion block: ReLU, optional BatchNorm, corners-aligned upsampling."""
    return FeatureFusionBlock_custom(features, nn.ReLU(False), deconv=False, bn=use_bn, expand=False,
                                     align_corners=True)


class DPT(BaseModel):
    """A DPT network with the output head `head` (at scratch.output_conv)."""

    def __init__(self, head: nn.Module, features: int = 256, backbone: str = "vitb_rn50_384",
                 readout: str = "project", channels_last: bool = False, use_bn: bool = False) -> None:
        super().__init__()
        if backbone not in HOOKS:
            raise ValueError(f"DPT backbone {backbone!r} is not known; expected one of {sorted(HOOKS)}")
        self.channels_last = channels_last
        self.pretrained, self.scratch = _make_encoder(backbone, features, False, groups=1, expand=False,
                                                      exportable=False, hooks=HOOKS[backbone], use_readout=readout)
        self.scratch.refinenet1 = _make_fusion_block(features, use_bn)
        self.scratch.refinenet2 = _make_fusion_block(features, use_bn)
        self.scratch.refinenet3 = _make_fusion_block(features, use_bn)
        self.scratch.refinenet4 = _make_fusion_block(features, use_bn)
        self.scratch.output_conv = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The head's output for images x (B, 3, H, W), H and W divisible by 32."""
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"{type(self).__name__} needs an input height and width divisible by 32, got "
                             f"{tuple(x.shape[-2:])}")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        layer_1, layer_2, layer_3, layer_4 = self.pretrained(x)
        path_4 = self.scratch.refinenet4(self.scratch.layer4_rn(layer_4))
        path_3 = self.scratch.refinenet3(path_4, self.scratch.layer3_rn(layer_3))
        path_2 = self.scratch.refinenet2(path_3, self.scratch.layer2_rn(layer_2))
        path_1 = self.scratch.refinenet1(path_2, self.scratch.layer1_rn(layer_1))
        return self.scratch.output_conv(path_1)


class DPTDepthModel(DPT):
    """DPT with the monocular depth head; forward gives (B, H, W) relative inverse depth (non-negative by default).

    `path` loads a MiDaS weight file (None: random weights, e.g. to be filled from a full checkpoint).
    """

    def __init__(self, path: str | os.PathLike | None = None, non_negative: bool = True, **kwargs) -> None:
        features = kwargs.get("features", 256)
        head = nn.Sequential(
            nn.Conv2d(features, features // 2, kernel_size=3, stride=1, padding=1),
            Interpolate(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(features // 2, 32, kernel_size=3, stride=1, padding=1),
            nn.ReLU(True),
            nn.Conv2d(32, 1, kernel_size=1, stride=1, padding=0),
            nn.ReLU(True) if non_negative else nn.Identity(),
            nn.Identity(),
        )
        super().__init__(head, **kwargs)
        if path is not None:
            self.load(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse depth (B, H, W) of images x (B, 3, H, W)."""
        return super().forward(x).squeeze(dim=1)
