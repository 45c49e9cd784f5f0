"""Landscape photographs with semantic maps, the data of the published semantic-synthesis LDM
(`models/ldm/semantic_synthesis512`: `ldm.data.landscapes.RFWTrain/RFWValidation` with `size`, `crop_size`,
`segmentation_to_float32`). The original reader was never published; this one reads the layout of taming-transformers'
`sflckr` segmentation data, which the LDM paper's landscapes follow (COCO-Stuff labels, 182 classes):

    data/rfw/images/<name>.jpg            photographs (any PIL format)
    data/rfw/segmentations/<name>.png     one 8-bit label per pixel (mode L), same name with .png
    data/rfw/rfw_train.txt                image paths relative to images/, one per line (rfw_validation.txt likewise)

`$LDM_RFW_ROOT` or `data_root` replaces `data/rfw`. Examples: `image` (crop_size^2 x 3 float32 in [-1, 1]) and
`segmentation` (crop_size^2 x n_labels one-hot; float32 with `segmentation_to_float32`, else uint8), plus
`file_path_`, `segmentation_path_`, `relative_file_path_`. The shorter side is resized to `size` (bicubic for the
photograph, nearest for the labels), then one crop of `crop_size` is taken from both: random for training, centred
for validation. Random offsets come from torch's global generator.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ldm.data.base import (
    load_rgb,
    rand_int,
    read_file_list,
    require_folder,
    resample_filter,
    resize_shorter_side,
    to_model_array,
)

logger = logging.getLogger(__name__)

ENV_ROOT = "LDM_RFW_ROOT"


class SegmentationBase(Dataset):
    """Photographs and their label maps listed in `list_file`; see the module docstring."""

    def __init__(self, list_file: str, images: str, segmentations: str, size: Optional[int] = None,
                 crop_size: Optional[int] = None, random_crop: bool = False, interpolation: str = "bicubic",
                 n_labels: int = 182, shift_segmentation: bool = False, segmentation_to_float32: bool = False) -> None:
        owner = type(self).__name__
        layout = (f"{images}/ with the photographs, {segmentations}/ with one mode-L .png label map per photograph "
                  f"(same name) and {list_file} listing the photographs relative to {images}/; set data_root or "
                  f"${ENV_ROOT} to the folder holding them")
        self.images = require_folder(images, owner, layout)
        self.segmentations = require_folder(segmentations, owner, layout)
        self.relpaths = read_file_list(list_file, owner, layout)
        if crop_size is not None and size is not None and crop_size > size:
            raise ValueError(f"{owner}: crop_size={crop_size} is larger than size={size}")
        self.size, self.crop_size, self.random_crop = size, crop_size, random_crop
        self.resample = resample_filter(interpolation)
        self.n_labels, self.shift_segmentation = int(n_labels), shift_segmentation
        self.segmentation_dtype = np.float32 if segmentation_to_float32 else np.uint8
        logger.info("%s: %d photographs under %s", owner, len(self.relpaths), self.images)

    def __len__(self) -> int:
        return len(self.relpaths)

    def _labels(self, path: Path) -> Image.Image:
        with Image.open(path) as labels:
            if labels.mode != "L":
                raise ValueError(f"{type(self).__name__}: label map {path} has mode {labels.mode}; expected 8-bit "
                                 "labels (mode L)")
            labels.load()
            return labels.copy()

    def __getitem__(self, index: int) -> dict[str, Any]:
        relpath = self.relpaths[index]
        image_path = self.images / relpath
        label_path = self.segmentations / Path(relpath).with_suffix(".png")
        image, labels = load_rgb(image_path), self._labels(label_path)
        if image.size != labels.size:
            raise ValueError(f"{type(self).__name__}: {image_path} is {image.size} but {label_path} is {labels.size}")
        if self.size:
            image = resize_shorter_side(image, int(self.size), self.resample)
            labels = resize_shorter_side(labels, int(self.size), Image.Resampling.NEAREST)
        if self.crop_size:
            side = int(self.crop_size)
            width, height = image.size
            if self.random_crop:
                left, top = rand_int(width - side + 1), rand_int(height - side + 1)
            else:
                left, top = (width - side) // 2, (height - side) // 2
            box = (left, top, left + side, top + side)
            image, labels = image.crop(box), labels.crop(box)
        label_array = np.asarray(labels, dtype=np.int64) + (1 if self.shift_segmentation else 0)
        if label_array.max(initial=0) >= self.n_labels:
            raise ValueError(f"{type(self).__name__}: {label_path} holds label {label_array.max()} but n_labels is "
                             f"{self.n_labels}")
        onehot = np.eye(self.n_labels, dtype=self.segmentation_dtype)[label_array]
        return {"image": to_model_array(image), "segmentation": onehot, "file_path_": str(image_path),
                "segmentation_path_": str(label_path), "relative_file_path_": relpath}


class _RFWSplit(SegmentationBase):
    LIST = ""
    RANDOM_CROP = False

    def __init__(self, size: Optional[int] = None, crop_size: Optional[int] = None,
                 segmentation_to_float32: bool = False, data_root: Optional[str] = None, **kwargs: Any) -> None:
        root = Path(data_root or os.environ.get(ENV_ROOT, "data/rfw"))
        kwargs.setdefault("random_crop", self.RANDOM_CROP)
        super().__init__(str(root / self.LIST), str(root / "images"), str(root / "segmentations"), size=size,
                         crop_size=crop_size, segmentation_to_float32=segmentation_to_float32, **kwargs)


class RFWTrain(_RFWSplit):
    """Landscapes, training list (random crops)."""

    LIST, RANDOM_CROP = "rfw_train.txt", True


class RFWValidation(_RFWSplit):
    """Landscapes, validation list (centre crops)."""

    LIST = "rfw_validation.txt"
