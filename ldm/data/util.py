"""Per-example data transforms SD 2's depth-to-image uses (the original `ldm.data.util`)."""
from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import numpy as np
import torch

from ldm.modules.midas.api import load_midas_transform


class AddMiDaS:
    """Adds `midas_in` to an example: its `jpg` image (HWC in [-1, 1]) prepared for the MiDaS `model_type` network
    (resized with the aspect kept to a multiple of 32, normalised, CHW float32), which LatentDepth2ImageDiffusion's
    depth stage reads."""

    def __init__(self, model_type: str):
        super().__init__()
        self.transform = load_midas_transform(model_type)

    def pt2np(self, x: Any) -> np.ndarray:
        """A [-1, 1] image (tensor or array) as a float array in [0, 1]."""
        x = torch.as_tensor(x)
        return ((x + 1.0) * 0.5).detach().cpu().numpy()

    def np2pt(self, x: np.ndarray) -> torch.Tensor:
        """A [0, 1] array as a [-1, 1] tensor."""
        return torch.from_numpy(x) * 2 - 1.0

    def __call__(self, sample: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """The example with `midas_in` added (sample['jpg'] is an HWC image in [-1, 1])."""
        if "jpg" not in sample:
            raise KeyError(f"AddMiDaS: the example has no 'jpg' image (keys: {', '.join(map(str, sample))})")
        sample["midas_in"] = self.transform({"image": self.pt2np(sample["jpg"])})["image"]
        return sample
