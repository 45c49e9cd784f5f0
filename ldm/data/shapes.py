"""Procedural shapes: one coloured circle, square or triangle on a plain background, with a caption.

Each example is a pure function of (seed, split, index): nothing is downloaded or stored, any
resolution works, and the ground-truth attributes come with the pixels. Shapes are drawn with PIL at
4× the target resolution and box-filtered down, so edges are anti-aliased.

`class_label = SHAPES.index(shape) * len(COLORS) + list(COLORS).index(color)` (21 classes:
circle/red = 0, circle/orange = 1, ..., triangle/purple = 20); see `class_label_of`.
The shape colours (`COLORS`) and background colours (`BACKGROUNDS`) are disjoint palettes, so a
shape never has its background's colour. `judge_shape_image` reads shape and colour back from pixels.
"""
from __future__ import annotations

import logging
import random
from collections import deque
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ldm.data.base import to_model_array
from ldm.modules.image_degradation import make_degradation

logger = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (255, 225, 30),
    "green": (30, 170, 50),
    "cyan": (0, 205, 220),
    "blue": (30, 70, 230),
    "purple": (140, 50, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SIZE_RANGE = (0.35, 0.70)  # side of the shape's bounding box, as a fraction of the image side
SUPERSAMPLE = 4
_SPLIT_STREAMS = {"train": 0, "validation": 1}
# The judge's cues per shape: fill ratio (area / bounding-box area) and the correlation of row width
# with row index (an upward triangle widens linearly downwards; circles and squares are symmetric).
_PROTOTYPES = {"circle": (np.pi / 4, 0.0), "square": (1.0, 0.0), "triangle": (0.5, 1.0)}
_WIDENING_WEIGHT = 0.35
FAINT_COVERAGE = 0.3  # coverage below this counts as background in judge_shape_image


def class_label_of(shape: str, color: str) -> int:
    """The class index of a (shape, colour) pair: shape_index * len(COLORS) + colour_index."""
    return SHAPES.index(shape) * len(COLORS) + list(COLORS).index(color)


def caption_of(shape: str, color: str, background: str) -> str:
    """The caption of a shape image, e.g. 'a red circle on a white background'."""
    return f"a {color} {shape} on a {background} background"


def _polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]]:
    """Vertices of a square or upward triangle with a `side`×`side` bounding box centred at (cx, cy)."""
    h = side / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]


def render_shape(
    shape: str,
    color: str,
    background: str,
    center: tuple[float, float],
    side: float,
    size: int,
    supersample: int = SUPERSAMPLE,
) -> np.ndarray:
    """An anti-aliased `size`×`size` uint8 RGB image of one shape; `center`, `side` in output pixels."""
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is not one of {SHAPES}")
    big = size * supersample
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[background])
    draw = ImageDraw.Draw(canvas)
    cx, cy, s = center[0] * supersample, center[1] * supersample, side * supersample
    fill = COLORS[color]
    if shape == "circle":
        # PIL's ellipse box is inclusive of its right/bottom pixel: shrink by one so the extent is exactly s.
        draw.ellipse([cx - s / 2, cy - s / 2, cx + s / 2 - 1, cy + s / 2 - 1], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx - 0.5, cy - 0.5, s), fill=fill)
    return np.asarray(canvas.resize((size, size), resample=Image.Resampling.BOX))


class ShapesDataset(Dataset):
    """Captioned images of one shape each, deterministic by (seed, split, index); no files involved.

    Example keys: `image` (HWC float32 in [-1, 1]), `caption`, `class_label`, `shape`, `color`,
    `background`, `bbox` (x0, y0, x1, y1 in pixels), `center` (x, y in pixels), `shape_size`
    (bounding-box side as a fraction of the image side). Restrict `shapes`/`colors`/`backgrounds`
    to subsets of the palettes for smaller problems; class labels keep their global meaning.
    """

    def __init__(
        self,
        size: int = 32,
        length: int = 10000,
        seed: int = 0,
        split: str = "train",
        shapes: Optional[Sequence[str]] = None,
        colors: Optional[Sequence[str]] = None,
        backgrounds: Optional[Sequence[str]] = None,
        size_range: Sequence[float] = SIZE_RANGE,
    ) -> None:
        if int(size) < 8:
            raise ValueError(f"ShapesDataset: size={size} is too small; expected at least 8 pixels")
        if split not in _SPLIT_STREAMS:
            raise ValueError(f"ShapesDataset: split={split!r} is not one of {sorted(_SPLIT_STREAMS)}")
        self.size, self.length, self.seed, self.split = int(size), int(length), int(seed), split
        self.shapes = self._subset(shapes, SHAPES, "shapes")
        self.colors = self._subset(colors, tuple(COLORS), "colors")
        self.backgrounds = self._subset(backgrounds, tuple(BACKGROUNDS), "backgrounds")
        lo, hi = (float(v) for v in size_range)
        if not 0.05 <= lo <= hi <= 0.9:
            raise ValueError(f"ShapesDataset: size_range={list(size_range)} must satisfy 0.05 <= low <= high <= 0.9")
        self.size_range = (lo, hi)

    @staticmethod
    def _subset(chosen: Optional[Sequence[str]], allowed: tuple[str, ...], key: str) -> tuple[str, ...]:
        """Validate a user-chosen subset of a palette (None = all of it)."""
        if chosen is None:
            return allowed
        chosen = tuple(str(c) for c in chosen)
        unknown = [c for c in chosen if c not in allowed]
        if unknown or not chosen:
            raise ValueError(f"ShapesDataset: {key}={list(chosen)} must be a non-empty subset of {list(allowed)}")
        return chosen

    def __len__(self) -> int:
        return self.length

    def attributes(self, index: int) -> dict[str, Any]:
        """The ground truth of example `index` (shape, colours, geometry), without rendering it."""
        if not 0 <= index < self.length:
            raise IndexError(f"ShapesDataset index {index} out of range for length {self.length}")
        rng = np.random.default_rng([self.seed, _SPLIT_STREAMS[self.split], index])
        shape = self.shapes[rng.integers(len(self.shapes))]
        color = self.colors[rng.integers(len(self.colors))]
        background = self.backgrounds[rng.integers(len(self.backgrounds))]
        rel = float(rng.uniform(*self.size_range))
        side = rel * self.size
        margin = side / 2 + 1.0  # keep one clear pixel between the shape and the border
        cx, cy = (float(rng.uniform(margin, self.size - margin)) for _ in range(2))
        return {
            "shape": shape,
            "color": color,
            "background": background,
            "caption": caption_of(shape, color, background),
            "class_label": class_label_of(shape, color),
            "center": np.array([cx, cy], dtype=np.float32),
            "bbox": np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dtype=np.float32),
            "shape_size": np.float32(rel),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.attributes(int(index))
        side = float(example["shape_size"]) * self.size
        pixels = render_shape(
            example["shape"], example["color"], example["background"], tuple(example["center"]), side, self.size
        )
        example["image"] = to_model_array(pixels)
        return example


class ShapesTrain(ShapesDataset):
    """The training stream of `ShapesDataset`."""

    def __init__(self, size: int = 32, length: int = 10000, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(size=size, length=length, seed=seed, split="train", **kwargs)


class ShapesValidation(ShapesDataset):
    """The held-out stream of `ShapesDataset`: same seed, a different random stream than `ShapesTrain`."""

    def __init__(self, size: int = 32, length: int = 1000, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(size=size, length=length, seed=seed, split="validation", **kwargs)


# ----------------------------------------------------------------------------------------------
# Scenes: several shapes per image, with their layout and label map

SCENE_SIZE_RANGE = (0.3, 0.5)  # smaller than one shape's, so that up to three fit side by side
SEGMENTATION_LABELS: tuple[str, ...] = ("background",) + SHAPES  # the label map's values
_SCENE_STREAM = 1  # the scenes' random stream differs from ShapesDataset's for the same (seed, split, index)
_PLACEMENT_TRIES = 20


def scene_caption(objects: Sequence[tuple[str, str]], background: str) -> str:
    """'a red circle, a blue square and a green triangle on a white background' for (shape, colour) pairs."""
    names = [f"a {color} {shape}" for shape, color in objects]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed} on a {background} background"


def _box_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over the smaller area of two (x0, y0, x1, y1) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    return float(w * h / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])))


def render_scene(objects: Sequence[dict[str, Any]], background: str, size: int,
                 supersample: int = SUPERSAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB image, int64 label map) of shapes drawn in order (later ones on top); `objects` hold `shape`,
    `color`, `center`, `side` in output pixels. A pixel's label is the most covered of its supersampled block
    (0 background, 1 + SHAPES.index otherwise)."""
    big = size * supersample
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[background])
    labels = Image.new("L", (big, big), 0)
    for obj in objects:
        cx, cy = obj["center"][0] * supersample, obj["center"][1] * supersample
        s, label = obj["side"] * supersample, 1 + SHAPES.index(obj["shape"])
        for draw, fill in ((ImageDraw.Draw(canvas), COLORS[obj["color"]]), (ImageDraw.Draw(labels), label)):
            if obj["shape"] == "circle":
                draw.ellipse([cx - s / 2, cy - s / 2, cx + s / 2 - 1, cy + s / 2 - 1], fill=fill)
            else:
                draw.polygon(_polygon(obj["shape"], cx - 0.5, cy - 0.5, s), fill=fill)
    pixels = np.asarray(canvas.resize((size, size), resample=Image.Resampling.BOX))
    blocks = np.asarray(labels).reshape(size, supersample, size, supersample).transpose(0, 2, 1, 3)
    counts = np.eye(len(SEGMENTATION_LABELS), dtype=np.int64)[blocks.reshape(size, size, -1)].sum(axis=2)
    return pixels, counts.argmax(axis=-1)


def scene_depth(objects: Sequence[dict[str, Any]], background: str, size: int,
                supersample: int = SUPERSAMPLE) -> np.ndarray:
    """The inverse depth [1, size, size] (float32 in [0, 1], MiDaS' sense: larger is nearer) of a scene: the
    background at 0, object k (drawn in order, later ones on top) a flat card at `depth`, anti-aliased."""
    big = size * supersample
    canvas = Image.new("F", (big, big), 0.0)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        cx, cy, s = obj["center"][0] * supersample, obj["center"][1] * supersample, obj["side"] * supersample
        if obj["shape"] == "circle":
            draw.ellipse([cx - s / 2, cy - s / 2, cx + s / 2 - 1, cy + s / 2 - 1], fill=float(obj["depth"]))
        else:
            draw.polygon(_polygon(obj["shape"], cx - 0.5, cy - 0.5, s), fill=float(obj["depth"]))
    blocks = np.asarray(canvas, dtype=np.float32).reshape(size, supersample, size, supersample)
    return blocks.mean(axis=(1, 3))[None]


class ShapesScenes(Dataset):
    """Images of `min_objects`..`max_objects` shapes each (distinct colours, little overlap) on a plain background,
    deterministic by (seed, split, index), with what the layout-to-image and semantic-synthesis tasks read.

    Example keys: `image` (HWC float32 in [-1, 1]), `caption` ('a red circle and a blue square on a white
    background'), `background`, `n_objects`, `class_labels` [max_objects] (`class_label_of` each object, -1 padding),
    `bboxes` [max_objects, 4] (x0, y0, x1, y1 in pixels, zero padding), `coordinates_bbox` (the layout as a long
    token sequence of `layout_builder`: one (class, top-left, bottom-right) triple per object, the full-image crop),
    `segmentation` (HWC float32 one-hot over `SEGMENTATION_LABELS`: background, circle, square, triangle) and
    `segmentation_labels` (HW int64 label map) and `depth` ([1, H, W] float32 inverse depth in [0, 1]: background
    0, each shape a flat card nearer than those it covers; what depth-to-image models read instead of MiDaS').
    """

    def __init__(self, size: int = 16, length: int = 10000, seed: int = 0, split: str = "train",
                 min_objects: int = 1, max_objects: int = 3, shapes: Optional[Sequence[str]] = None,
                 colors: Optional[Sequence[str]] = None, backgrounds: Optional[Sequence[str]] = None,
                 size_range: Sequence[float] = SCENE_SIZE_RANGE, no_tokens: int = 256, max_overlap: float = 0.25
                 ) -> None:
        from ldm.modules.encoders.layout import BoundingBoxLayout

        base = ShapesDataset(size=size, length=length, seed=seed, split=split, shapes=shapes, colors=colors,
                             backgrounds=backgrounds, size_range=size_range)  # validates the common arguments
        self.size, self.length, self.seed, self.split = base.size, base.length, base.seed, base.split
        self.shapes, self.colors, self.backgrounds, self.size_range = base.shapes, base.colors, base.backgrounds, \
            base.size_range
        if not 1 <= int(min_objects) <= int(max_objects) <= len(self.colors):
            raise ValueError(f"ShapesScenes: need 1 <= min_objects ({min_objects}) <= max_objects ({max_objects}) "
                             f"<= the number of colours ({len(self.colors)})")
        if not 0.0 <= float(max_overlap) <= 1.0:
            raise ValueError(f"ShapesScenes: max_overlap={max_overlap} must lie in [0, 1]")
        self.min_objects, self.max_objects, self.max_overlap = int(min_objects), int(max_objects), float(max_overlap)
        self.layout_builder = BoundingBoxLayout(len(SHAPES) * len(COLORS), self.max_objects, int(no_tokens),
                                                category_names=[f"{c} {s}" for s in SHAPES for c in COLORS])

    def __len__(self) -> int:
        return self.length

    def _place(self, rng: np.random.Generator, placed: list[np.ndarray]) -> tuple[float, np.ndarray]:
        """A side and box for the next shape: the first of a few draws that overlaps the placed ones little."""
        for _ in range(_PLACEMENT_TRIES):
            side = float(rng.uniform(*self.size_range)) * self.size
            margin = side / 2 + 1.0
            cx, cy = (float(rng.uniform(margin, self.size - margin)) for _ in range(2))
            box = np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dtype=np.float32)
            if all(_box_overlap(box, other) <= self.max_overlap for other in placed):
                break
        return side, box

    def attributes(self, index: int) -> dict[str, Any]:
        """The ground truth of example `index` (background, the objects in drawing order), without rendering it."""
        if not 0 <= index < self.length:
            raise IndexError(f"ShapesScenes index {index} out of range for length {self.length}")
        rng = np.random.default_rng([self.seed, _SPLIT_STREAMS[self.split], index, _SCENE_STREAM])
        background = self.backgrounds[rng.integers(len(self.backgrounds))]
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        colors = [self.colors[i] for i in rng.choice(len(self.colors), size=n, replace=False)]
        objects, boxes = [], []
        for color in colors:
            shape = self.shapes[rng.integers(len(self.shapes))]
            side, box = self._place(rng, boxes)
            boxes.append(box)
            objects.append({"shape": shape, "color": color, "side": side, "bbox": box,
                            "center": ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)})
        # inverse depths, nearer for shapes drawn later (they cover the earlier ones): sorted draws in [0.3, 1]
        for obj, depth in zip(objects, np.sort(rng.uniform(0.3, 1.0, size=n))):
            obj["depth"] = float(depth)
        return {"background": background, "objects": objects}

    def __getitem__(self, index: int) -> dict[str, Any]:
        truth = self.attributes(int(index))
        objects, k = truth["objects"], self.max_objects
        pixels, label_map = render_scene(objects, truth["background"], self.size)
        class_labels = np.full(k, -1, dtype=np.int64)
        bboxes = np.zeros((k, 4), dtype=np.float32)
        layout = []
        for i, obj in enumerate(objects):
            class_labels[i] = class_label_of(obj["shape"], obj["color"])
            bboxes[i] = obj["bbox"]
            x0, y0, x1, y1 = (float(v) / self.size for v in obj["bbox"])
            layout.append((int(class_labels[i]), (x0, y0, x1 - x0, y1 - y0)))
        return {
            "image": to_model_array(pixels),
            "caption": scene_caption([(o["shape"], o["color"]) for o in objects], truth["background"]),
            "background": truth["background"],
            "n_objects": len(objects),
            "class_labels": class_labels,
            "bboxes": bboxes,
            "coordinates_bbox": self.layout_builder.build(layout),
            "segmentation": np.eye(len(SEGMENTATION_LABELS), dtype=np.float32)[label_map],
            "segmentation_labels": label_map,
            "depth": scene_depth(objects, truth["background"], self.size),
        }


class ShapesScenesTrain(ShapesScenes):
    """The training stream of `ShapesScenes`."""

    def __init__(self, size: int = 16, length: int = 10000, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(size=size, length=length, seed=seed, split="train", **kwargs)


class ShapesScenesValidation(ShapesScenes):
    """The held-out stream of `ShapesScenes`."""

    def __init__(self, size: int = 16, length: int = 1000, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(size=size, length=length, seed=seed, split="validation", **kwargs)


# ----------------------------------------------------------------------------------------------
# Judge: shape and colour from pixels


def _as_uint8_range(img: Union[np.ndarray, torch.Tensor, Image.Image]) -> np.ndarray:
    """HWC float64 RGB in 0..255 from a PIL image, a uint8 array, or a float array/tensor in [-1, 1] (HWC or CHW)."""
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"), dtype=np.float64)
    if isinstance(img, torch.Tensor):
        img = img.detach().cpu().float().numpy()
    array = np.asarray(img)
    if array.ndim != 3:
        raise ValueError(f"judge_shape_image expects one RGB image (HWC or CHW), got shape {array.shape}")
    if array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if array.dtype == np.uint8:
        return array.astype(np.float64)
    return (np.clip(array.astype(np.float64), -1.0, 1.0) + 1.0) * 127.5


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        queue, count = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            count += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    queue.append((ny, nx))
        if count > best_size:
            best, best_size = current, count
    return labels == best


def nearest_color(rgb: Sequence[float], palette: dict[str, tuple[int, int, int]] = COLORS) -> str:
    """The name of the palette colour closest to `rgb` (Euclidean in RGB)."""
    names = list(palette)
    dist = np.linalg.norm(np.asarray([palette[n] for n in names], dtype=np.float64) - np.asarray(rgb), axis=1)
    return names[int(np.argmin(dist))]


def shape_coverage(img: Union[np.ndarray, torch.Tensor, Image.Image]) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(coverage map in [0, 1] of the dominant non-background region, its median colour); (None, None) if blank."""
    x = _as_uint8_range(img)
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    background = np.median(border, axis=0)
    dist = np.linalg.norm(x - background, axis=-1)
    reference = np.percentile(dist, 99)
    if reference < 40.0:  # nothing stands out from the background
        return None, None
    core = _largest_component(dist >= 0.7 * reference)
    foreground = np.median(x[core], axis=0)
    direction = foreground - background
    # Fraction of each pixel covered by the foreground colour (anti-aliased edges are linear blends).
    alpha = np.clip((x - background) @ direction / float(direction @ direction), 0.0, 1.0)
    # Faint tints (generated or reconstructed images ring around edges) are not part of the shape: without this,
    # a halo under 30% coverage filling a triangle's bounding-box corners made it read as a circle.
    alpha = np.where(alpha >= FAINT_COVERAGE, alpha, 0.0)
    region = _largest_component(alpha >= 0.5)
    ys, xs = np.nonzero(region)
    keep = np.zeros_like(alpha)
    keep[max(ys.min() - 1, 0) : ys.max() + 2, max(xs.min() - 1, 0) : xs.max() + 2] = 1.0
    return alpha * keep, foreground


def judge_shape_image(img: Union[np.ndarray, torch.Tensor, Image.Image]) -> tuple[Optional[str], Optional[str]]:
    """(shape name, colour name) of the dominant non-background region, or (None, None) for a blank image.

    Colour: nearest `COLORS` entry to the region's median colour. Shape: nearest prototype in
    (fill ratio, widening) where fill is the region's area over its bounding-box area (circle π/4,
    square 1, triangle 1/2, from sub-pixel coverage) and widening the correlation of row width with
    row index (triangle 1, others 0).
    """
    alpha, foreground = shape_coverage(img)
    if alpha is None:
        return None, None
    fill = alpha.sum() / max(alpha.max(axis=0).sum() * alpha.max(axis=1).sum(), 1e-6)
    row_width = alpha.sum(axis=1)
    rows = np.nonzero(row_width > 0)[0]
    widening = float(np.corrcoef(rows, row_width[rows])[0, 1]) if row_width[rows].std() > 1e-9 else 0.0

    def distance(name: str) -> float:
        """Squared distance of the measured cues to one shape's prototype."""
        proto_fill, proto_widening = _PROTOTYPES[name]
        return (fill - proto_fill) ** 2 + (_WIDENING_WEIGHT * (widening - proto_widening)) ** 2

    return min(_PROTOTYPES, key=distance), nearest_color(foreground)


# ----------------------------------------------------------------------------------------------
# Super-resolution pairs


class ShapesSR(ShapesDataset):
    """`ShapesDataset` examples with `LR_image`: the image `downscale_f` times smaller, degraded with any
    name of `ldm.modules.image_degradation.DEGRADATIONS` (BSRGAN draws are seeded by (seed, split, index))."""

    def __init__(self, size: int = 32, length: int = 10000, seed: int = 0, split: str = "train",
                 degradation: str = "pil_bicubic", downscale_f: int = 4, **kwargs: Any) -> None:
        if int(downscale_f) < 1 or int(size) % int(downscale_f):
            raise ValueError(f"ShapesSR: size={size} must be divisible by downscale_f={downscale_f}")
        super().__init__(size=size, length=length, seed=seed, split=split, **kwargs)
        self.downscale_f = int(downscale_f)
        self.degrade = make_degradation(degradation, self.downscale_f, key="ShapesSR: degradation")

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = super().__getitem__(index)
        pixels = np.round((example["image"] + 1.0) * 127.5).astype(np.uint8)
        rng = random.Random(f"{self.seed}/{self.split}/{int(index)}")
        example["LR_image"] = to_model_array(self.degrade(pixels, rng))
        return example
