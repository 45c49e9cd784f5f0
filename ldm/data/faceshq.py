"""CelebA-HQ and FFHQ readers with the classes and parameters the published configs name
(`ldm.data.faceshq.CelebAHQTrain/CelebAHQValidation/FFHQTrain/FFHQValidation`, `size`; the original classes lived in
taming-transformers' `taming.data.faceshq`, whose layout this follows).

Layout, relative to the working directory as the original (or under `$LDM_FACESHQ_ROOT`, or `data_root`):

    data/celebahq/...            CelebA-HQ images: the .npy arrays (1, 3, 1024, 1024) uint8 that taming used, or
                                 image files (.png/.jpg)
    data/celebahqtrain.txt       one path per line, relative to data/celebahq/ (celebahqvalidation.txt likewise)
    data/ffhq/...                FFHQ images (.png)
    data/ffhqtrain.txt           paths relative to data/ffhq/ (ffhqvalidation.txt likewise)

Examples: `image` (size x size x 3 float32 in [-1, 1]: shorter side resized to `size`, centre crop) and
`file_path_`; `keys` keeps only the named keys, as the original.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ldm.data.base import load_rgb, read_file_list, require_folder, resample_filter, resize_and_crop, to_model_array

logger = logging.getLogger(__name__)

ENV_ROOT = "LDM_FACESHQ_ROOT"


def _load_face(path: str) -> Image.Image:
    """A CelebA-HQ .npy array (1, 3, H, W) or (3, H, W) uint8, or any image file, as an RGB PIL image."""
    if path.endswith(".npy"):
        array = np.load(path)
        array = array.reshape(array.shape[-3:]) if array.ndim == 4 else array
        if array.ndim != 3 or array.shape[0] != 3:
            raise ValueError(f"{path}: expected a (1, 3, H, W) or (3, H, W) uint8 array, got shape {array.shape}")
        return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)).astype(np.uint8), mode="RGB")
    return load_rgb(path)


class FacesBase(Dataset):
    """Face images listed in `<data>/<LIST>` under `<data>/<FOLDER>`; subclasses name the folder and list."""

    FOLDER = ""
    LIST = ""

    def __init__(self, size: Optional[int] = None, keys: Optional[Sequence[str]] = None,
                 data_root: Optional[str] = None, interpolation: str = "bilinear") -> None:
        data = Path(data_root or os.environ.get(ENV_ROOT, "data"))
        owner = type(self).__name__
        layout = (f"{data}/{self.FOLDER}/ holding the images and {data}/{self.LIST} listing them (one path per line, "
                  f"relative to {self.FOLDER}/); set data_root or ${ENV_ROOT} to the folder holding both")
        self.root = require_folder(data / self.FOLDER, owner, layout)
        self.relpaths = read_file_list(data / self.LIST, owner, layout)
        self.size = size
        self.keys = list(keys) if keys is not None else None
        self.resample = resample_filter(interpolation)
        logger.info("%s: %d images under %s", owner, len(self.relpaths), self.root)

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = str(self.root / self.relpaths[index])
        image = _load_face(path)
        if self.size:
            image = resize_and_crop(image, int(self.size), random_crop=False, resample=self.resample)
        example = {"image": to_model_array(image), "file_path_": path}
        return {k: example[k] for k in self.keys} if self.keys is not None else example


class CelebAHQTrain(FacesBase):
    """CelebA-HQ, training list."""

    FOLDER, LIST = "celebahq", "celebahqtrain.txt"


class CelebAHQValidation(FacesBase):
    """CelebA-HQ, validation list."""

    FOLDER, LIST = "celebahq", "celebahqvalidation.txt"


class FFHQTrain(FacesBase):
    """FFHQ, training list."""

    FOLDER, LIST = "ffhq", "ffhqtrain.txt"


class FFHQValidation(FacesBase):
    """FFHQ, validation list."""

    FOLDER, LIST = "ffhq", "ffhqvalidation.txt"
