"""Inpainting examples from any image dataset: random box and brush-stroke masks, deterministic by seed.

`InpaintingDataset` wraps a dataset whose examples hold an `image` (HWC float32 in [-1, 1]) and adds
what `LatentInpaintDiffusion` reads, in the format of Stable Diffusion 2's inpainting data:
`mask` (HW1 float32, 1 = region to fill in) and `masked_image` (the image with that region set to 0).
The mask of example i depends only on (seed, i).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ldm.util import instantiate_from_config

MASK_KINDS = ("box", "brush", "mixed")


def _draw_boxes(draw: ImageDraw.ImageDraw, height: int, width: int, rng: np.random.Generator) -> None:
    """One to three axis-aligned rectangles, each side 15-50% of the image's."""
    for _ in range(int(rng.integers(1, 4))):
        bw, bh = rng.uniform(0.15, 0.5) * width, rng.uniform(0.15, 0.5) * height
        x0, y0 = rng.uniform(0, width - bw), rng.uniform(0, height - bh)
        draw.rectangle([x0, y0, x0 + bw - 1, y0 + bh - 1], fill=255)


def _draw_strokes(draw: ImageDraw.ImageDraw, height: int, width: int, rng: np.random.Generator) -> None:
    """One to three thick polylines of 2-5 random segments with round joints and ends."""
    side = min(height, width)
    for _ in range(int(rng.integers(1, 4))):
        thickness = max(1, round(rng.uniform(0.06, 0.16) * side))
        points = [(rng.uniform(0, width), rng.uniform(0, height))]
        for _ in range(int(rng.integers(2, 6))):
            angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.35) * side
            x = float(np.clip(points[-1][0] + length * math.cos(angle), 0, width - 1))
            y = float(np.clip(points[-1][1] + length * math.sin(angle), 0, height - 1))
            points.append((x, y))
        draw.line(points, fill=255, width=thickness, joint="curve")
        r = thickness / 2
        for x, y in (points[0], points[-1]):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)


def random_mask(height: int, width: int, rng: np.random.Generator, kind: str = "mixed") -> np.ndarray:
    """A binary float32 HxW mask (1 = fill in) of random boxes, brush strokes, or either/both ('mixed')."""
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind={kind!r} is not known; expected one of {list(MASK_KINDS)}")
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    boxes = kind == "box" or (kind == "mixed" and rng.random() < 0.5)
    strokes = kind == "brush" or (kind == "mixed" and (not boxes or rng.random() < 0.5))
    if boxes:
        _draw_boxes(draw, height, width, rng)
    if strokes:
        _draw_strokes(draw, height, width, rng)
    return (np.asarray(canvas) > 127).astype(np.float32)


def add_mask(example: Mapping[str, Any], mask: np.ndarray, image_key: str = "image") -> dict[str, Any]:
    """A copy of `example` with `mask` (HW1) and `masked_image` (the image zeroed where mask is 1)."""
    image = np.asarray(example[image_key], dtype=np.float32)
    mask = np.asarray(mask, dtype=np.float32).reshape(*image.shape[:2], 1)
    return {**example, "mask": mask, "masked_image": image * (mask < 0.5)}


class InpaintingDataset(Dataset):
    """Examples of `dataset` with a random `mask` and `masked_image` added (see the module docstring).

    `dataset` is a Dataset or its `target`/`params` config; `mask_kind` is 'box', 'brush' or 'mixed';
    with probability `p_drop` the whole image is masked (as SD2's training did).
    """

    def __init__(self, dataset: Any, image_key: str = "image", mask_kind: str = "mixed", p_drop: float = 0.0,
                 seed: int = 0) -> None:
        if isinstance(dataset, Mapping) or hasattr(dataset, "keys"):
            dataset = instantiate_from_config(dataset, path="dataset")
        if mask_kind not in MASK_KINDS:
            raise ValueError(f"InpaintingDataset: mask_kind={mask_kind!r} is not one of {list(MASK_KINDS)}")
        if not 0.0 <= p_drop <= 1.0:
            raise ValueError(f"InpaintingDataset: p_drop={p_drop} must lie in [0, 1]")
        self.dataset, self.image_key, self.mask_kind = dataset, image_key, mask_kind
        self.p_drop, self.seed = float(p_drop), int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.dataset[index]
        if self.image_key not in example:
            raise KeyError(f"InpaintingDataset: the wrapped dataset's examples have no '{self.image_key}' "
                           f"(keys: {', '.join(map(str, example))}); set image_key")
        height, width = np.asarray(example[self.image_key]).shape[:2]
        rng = np.random.default_rng([self.seed, int(index)])
        mask = random_mask(height, width, rng, self.mask_kind)
        if self.p_drop > 0 and rng.random() < self.p_drop:
            mask = np.ones_like(mask)
        return add_mask(example, mask, self.image_key)
