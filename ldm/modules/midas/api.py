"""Build MiDaS depth models by name, as SD 2's depth stage does: `MiDaSInference(model_type="dpt_hybrid")` in a
config's `depth_stage_config`, `load_model(model_type)` and `load_midas_transform(model_type)`.

Weights: `model_path` names a MiDaS weight file. By default (`model_path="auto"`) the original's location
`midas_models/<file>` (relative to the working directory, as SD 2's README has them downloaded) is read when it
exists; otherwise the model starts from random weights and a warning says so, since a full depth-to-image checkpoint
holds them (`depth_model.model.*`) and replaces them when it loads. An explicit path that does not exist is an error;
`model_path=None` builds random weights without a word (tests).
"""
from __future__ import annotations

import logging
import os

import cv2
import torch
from torch import nn
from torchvision.transforms import Compose

from ldm.modules.midas.midas.dpt_depth import DPTDepthModel
from ldm.modules.midas.midas.midas_net import MidasNet
from ldm.modules.midas.midas.midas_net_custom import MidasNet_small
from ldm.modules.midas.midas.transforms import NormalizeImage, PrepareForNet, Resize
from ldm.util import CheckpointError

logger = logging.getLogger(__name__)

# where the original expected the published MiDaS files (midas_v21* had no default path there)
ISL_PATHS = {
    "dpt_large": "midas_models/dpt_large-midas-2f21e586.pt",
    "dpt_hybrid": "midas_models/dpt_hybrid-midas-501f0c75.pt",
    "midas_v21": "midas_models/midas_v21-f6b98070.pt",
    "midas_v21_small": "midas_models/midas_v21_small-70d6b9c8.pt",
}
AUTO = "auto"
DPT_NORMALIZATION = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}  # inputs in [-1, 1]
IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# model_type: (network input size, resize_method, normalisation)
INPUT_SPECS = {
    "dpt_large": (384, "minimal", DPT_NORMALIZATION),
    "dpt_hybrid": (384, "minimal", DPT_NORMALIZATION),
    "midas_v21": (384, "upper_bound", IMAGENET_NORMALIZATION),
    "midas_v21_small": (256, "upper_bound", IMAGENET_NORMALIZATION),
}


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """A `train` that leaves the module as it is (frozen stages stay in eval mode)."""
    return self


def _check_model_type(model_type: str) -> None:
    if model_type not in INPUT_SPECS:
        raise ValueError(f"MiDaS model_type {model_type!r} is not known; expected one of {sorted(INPUT_SPECS)}")


def load_midas_transform(model_type: str) -> Compose:
    """The input transform of `model_type`: Resize (aspect kept, multiple of 32, bicubic), normalise, CHW."""
    _check_model_type(model_type)
    size, resize_method, normalization = INPUT_SPECS[model_type]
    return Compose([
        Resize(size, size, resize_target=None, keep_aspect_ratio=True, ensure_multiple_of=32,
               resize_method=resize_method, image_interpolation_method=cv2.INTER_CUBIC),
        NormalizeImage(**normalization),
        PrepareForNet(),
    ])


def resolve_model_path(model_type: str, model_path: str | os.PathLike | None = AUTO) -> str | None:
    """The weight file to load for `model_type`, or None for random weights (see the module docstring)."""
    _check_model_type(model_type)
    if model_path is None:
        return None
    if model_path == AUTO:
        default = ISL_PATHS[model_type]
        if os.path.isfile(default):
            return default
        logger.warning("MiDaS %s: no weights at %s; starting from random weights (a depth-to-image checkpoint "
                       "provides them as depth_model.model.*; pass model_path to load a MiDaS file)",
                       model_type, os.path.abspath(default))
        return None
    if not os.path.isfile(model_path):
        raise CheckpointError(f"MiDaS weights '{os.fspath(model_path)}' (model_path for model_type '{model_type}') "
                              "do not exist")
    return os.fspath(model_path)


def build_network(model_type: str, path: str | None = None) -> nn.Module:
    """The MiDaS network of `model_type`, loading `path` when given."""
    _check_model_type(model_type)
    if model_type == "dpt_large":
        return DPTDepthModel(path=path, backbone="vitl16_384", non_negative=True)
    if model_type == "dpt_hybrid":
        return DPTDepthModel(path=path, backbone="vitb_rn50_384", non_negative=True)
    if model_type == "midas_v21":
        return MidasNet(path, non_negative=True)
    return MidasNet_small(path, features=64, backbone="efficientnet_lite3", exportable=True, non_negative=True,
                          blocks={"expand": True})


def load_model(model_type: str, model_path: str | os.PathLike | None = AUTO) -> tuple[nn.Module, Compose]:
    """(network in eval mode, its input transform) for `model_type`."""
    network = build_network(model_type, resolve_model_path(model_type, model_path))
    return network.eval(), load_midas_transform(model_type)


class MiDaSInference(nn.Module):
    """A frozen MiDaS network as a depth stage: forward(x) on normalised images (B, 3, H, W) (for the DPT models
    [-1, 1], as SD 2's depth model feeds them) gives relative inverse depth (B, 1, H, W), resized back bicubically.

    The network sits at `model`, so a depth-to-image checkpoint's `depth_model.model.*` keys load into it. It stays in
    eval mode and out of every optimiser.
    """

    MODEL_TYPES_TORCH_HUB = ["DPT_Large", "DPT_Hybrid", "MiDaS_small"]
    MODEL_TYPES_ISL = ["dpt_large", "dpt_hybrid", "midas_v21", "midas_v21_small"]

    def __init__(self, model_type: str, model_path: str | os.PathLike | None = AUTO) -> None:
        super().__init__()
        if model_type not in self.MODEL_TYPES_ISL:
            raise ValueError(f"depth_stage_config.params.model_type {model_type!r} is not one of "
                             f"{self.MODEL_TYPES_ISL}")
        self.model_type = model_type
        model, _ = load_model(model_type, model_path)
        self.model = model.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> MiDaSInference:
        """Stay in eval mode: the depth stage is frozen."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse depth (B, 1, H, W) of images x (B, 3, H, W), H and W divisible by 32."""
        with torch.no_grad():
            prediction = self.model(x)
            prediction = torch.nn.functional.interpolate(prediction.unsqueeze(1), size=x.shape[2:], mode="bicubic",
                                                         align_corners=False)
        return prediction
