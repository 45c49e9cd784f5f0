"""The MiDaS input transforms, applied to a sample dict whose `image` is an HWC float array in [0, 1]: resize to the
network's size (keeping the aspect ratio, sides a multiple of 32), normalise, and lay out as CHW float32."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

RESIZE_METHODS = ("lower_bound", "upper_bound", "minimal")


def apply_min_size(sample: dict[str, Any], size: Sequence[int], image_interpolation_method: int = cv2.INTER_AREA
                   ) -> tuple[int, int]:
    """Enlarge `image`, `disparity` and `mask` (keeping the aspect ratio) so that they are at least `size` (h, w)."""
    shape = list(sample["disparity"].shape)
    if shape[0] >= size[0] and shape[1] >= size[1]:
        return tuple(shape)
    scale = max(size[0] / shape[0], size[1] / shape[1])
    shape = [math.ceil(scale * shape[0]), math.ceil(scale * shape[1])]
    target = (shape[1], shape[0])
    sample["image"] = cv2.resize(sample["image"], target, interpolation=image_interpolation_method)
    sample["disparity"] = cv2.resize(sample["disparity"], target, interpolation=cv2.INTER_NEAREST)
    sample["mask"] = cv2.resize(sample["mask"].astype(np.float32), target, interpolation=cv2.INTER_NEAREST) > 0
    return tuple(shape)


class Resize:
    """Resize a sample to about (width, height): with `keep_aspect_ratio`, one scale for both sides chosen by
    `resize_method` ('lower_bound': at least that size, 'upper_bound': at most, 'minimal': the scale closest to 1),
    each side then rounded to a multiple of `ensure_multiple_of`. `resize_target` also resizes disparity, depth and
    mask (nearest neighbour)."""

    def __init__(self, width: int, height: int, resize_target: bool = True, keep_aspect_ratio: bool = False,
                 ensure_multiple_of: int = 1, resize_method: str = "lower_bound",
                 image_interpolation_method: int = cv2.INTER_AREA) -> None:
        if resize_method not in RESIZE_METHODS:
            raise ValueError(f"resize_method {resize_method!r} is not one of {RESIZE_METHODS}")
        self.width, self.height = width, height
        self.resize_target = resize_target
        self.keep_aspect_ratio = keep_aspect_ratio
        self.multiple_of = ensure_multiple_of
        self.resize_method = resize_method
        self.image_interpolation_method = image_interpolation_method

    def constrain_to_multiple_of(self, x: float, min_val: int = 0, max_val: int | None = None) -> int:
        """x rounded to a multiple (down when that exceeds max_val, up when it falls below min_val)."""
        y = int(np.round(x / self.multiple_of) * self.multiple_of)
        if max_val is not None and y > max_val:
            y = int(np.floor(x / self.multiple_of) * self.multiple_of)
        if y < min_val:
            y = int(np.ceil(x / self.multiple_of) * self.multiple_of)
        return y

    def get_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) an image of this size is resized to."""
        scale_height, scale_width = self.height / height, self.width / width
        if self.keep_aspect_ratio:
            if self.resize_method == "lower_bound":
                fit_width = scale_width > scale_height
            elif self.resize_method == "upper_bound":
                fit_width = scale_width < scale_height
            else:
                fit_width = abs(1 - scale_width) < abs(1 - scale_height)
            scale_height = scale_width = scale_width if fit_width else scale_height
        bounds = {"lower_bound": ({"min_val": self.height}, {"min_val": self.width}),
                  "upper_bound": ({"max_val": self.height}, {"max_val": self.width}),
                  "minimal": ({}, {})}[self.resize_method]
        new_height = self.constrain_to_multiple_of(scale_height * height, **bounds[0])
        new_width = self.constrain_to_multiple_of(scale_width * width, **bounds[1])
        return new_width, new_height

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The sample with its arrays resized."""
        width, height = self.get_size(sample["image"].shape[1], sample["image"].shape[0])
        sample["image"] = cv2.resize(sample["image"], (width, height), interpolation=self.image_interpolation_method)
        if self.resize_target:
            for key in ("disparity", "depth"):
                if key in sample:
                    sample[key] = cv2.resize(sample[key], (width, height), interpolation=cv2.INTER_NEAREST)
            if "mask" in sample:
                sample["mask"] = cv2.resize(sample["mask"].astype(np.float32), (width, height),
                                            interpolation=cv2.INTER_NEAREST).astype(bool)
        return sample


class NormalizeImage:
    """image = (image - mean) / std, per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = mean, std

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The sample with its image normalised."""
        sample["image"] = (sample["image"] - self.mean) / self.std
        return sample


class PrepareForNet:
    """image HWC -> CHW float32; mask, disparity and depth as contiguous float32."""

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The sample laid out for the network."""
        sample["image"] = np.ascontiguousarray(np.transpose(sample["image"], (2, 0, 1))).astype(np.float32)
        for key in ("mask", "disparity", "depth"):
            if key in sample:
                sample[key] = np.ascontiguousarray(sample[key].astype(np.float32))
        return sample
