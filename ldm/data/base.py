"""Helpers shared by the datasets: image loading, resizing/cropping, the [-1, 1] array format, splits, randomness.

Every dataset in `ldm.data` returns examples as the original code did: a dict whose `image` is an
HWC float32 numpy array in [-1, 1], plus metadata keys (`caption`, `class_label`, ...).
Random crops and flips draw from torch's global generator, which PyTorch seeds per DataLoader worker
and Lightning's `seed_everything` seeds in the main process, so runs are reproducible.
"""
from __future__ import annotations

import logging
import os
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, ImageColor
from torch.utils.data import IterableDataset

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "linear": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "area": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}

ColorSpec = Union[str, Sequence[int]]


def resample_filter(name: str, key: str = "interpolation") -> Image.Resampling:
    """The PIL filter for an interpolation name ('bicubic', 'lanczos', ...); a clear error names `key`."""
    try:
        return RESAMPLE[str(name).lower()]
    except KeyError:
        raise ValueError(f"{key}={name!r} is not a known interpolation; expected one of {sorted(RESAMPLE)}") from None


def parse_rgb(value: ColorSpec, key: str = "background") -> tuple[int, int, int]:
    """An RGB triple from a colour name ('white'), a hex string ('#ff8800') or a sequence of 3 ints 0-255."""
    if isinstance(value, str):
        try:
            rgb = ImageColor.getrgb(value)
        except ValueError:
            raise ValueError(f"{key}={value!r} is not a colour; expected a name like 'white', '#rrggbb' or [r, g, b]") from None
        return tuple(int(c) for c in rgb[:3])  # type: ignore[return-value]
    values = [int(c) for c in value]
    if len(values) != 3 or not all(0 <= c <= 255 for c in values):
        raise ValueError(f"{key}={list(value)!r} is not a colour; expected three integers in 0..255")
    return values[0], values[1], values[2]


def composite_on(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """An RGB image: `image` alpha-composited over a solid `background` when it has transparency, else converted."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: Union[str, os.PathLike], background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Decode an image file fully into RGB (transparent pixels become `background`)."""
    with Image.open(path) as image:
        image.load()
        return composite_on(image, background)


def to_model_array(image: Union[Image.Image, np.ndarray]) -> np.ndarray:
    """An 8-bit RGB image as the models' input format: HWC float32 in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32)
    return array / 127.5 - 1.0


def rand_uniform(low: float = 0.0, high: float = 1.0) -> float:
    """A float in [low, high) from torch's global generator (seeded per DataLoader worker)."""
    return low + (high - low) * float(torch.rand(()))


def rand_int(high: int) -> int:
    """An integer in [0, high) from torch's global generator."""
    return int(torch.randint(high, ())) if high > 1 else 0


def resize_shorter_side(image: Image.Image, size: int, resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """Scale `image` so its shorter side is `size` pixels, keeping the aspect ratio (PIL antialiases)."""
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image if new_size == image.size else image.resize(new_size, resample=resample)


def crop_square(image: Image.Image, side: int, random: bool = False) -> Image.Image:
    """A `side`×`side` crop of `image`: centred, or at a uniformly random offset."""
    width, height = image.size
    side = min(side, width, height)
    if random:
        left, top = rand_int(width - side + 1), rand_int(height - side + 1)
    else:
        left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def resize_and_crop(
    image: Image.Image, size: int, random_crop: bool = False, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> Image.Image:
    """Shorter side to `size`, then a centre or random `size`×`size` crop (the original's SmallestMaxSize + crop)."""
    return crop_square(resize_shorter_side(image, size, resample), size, random=random_crop)


def maybe_flip(image: Image.Image, flip_p: float) -> Image.Image:
    """Mirror `image` left-right with probability `flip_p`."""
    if flip_p > 0 and rand_uniform() < flip_p:
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def split_indices(n: int, split: str, val_fraction: float, seed: int) -> list[int]:
    """The indices of `split` ('train', 'validation' or 'all') in a seeded permutation of range(n)."""
    if split == "all":
        return list(range(n))
    if split not in ("train", "validation"):
        raise ValueError(f"split={split!r} is not known; expected 'train', 'validation' or 'all'")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)
    chosen = order[:n_val] if split == "validation" else order[n_val:]
    return sorted(int(i) for i in chosen)


def list_image_files(root: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files under `root` (recursive, hidden entries skipped), sorted by relative path."""
    suffixes = {e.lower() for e in extensions}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath, f) for f in filenames if not f.startswith(".") and Path(f).suffix.lower() in suffixes)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def warn_skipped(owner: str, paths: Sequence[Any], reason: str) -> None:
    """One warning naming every skipped file (the first 20) and how many there were."""
    if not paths:
        return
    shown = ", ".join(str(p) for p in paths[:20]) + (", ..." if len(paths) > 20 else "")
    logger.warning("%s: skipped %d %s file(s): %s", owner, len(paths), reason, shown)


class Txt2ImgIterableBaseDataset(IterableDataset):
    """Base of streamed (webdataset-style) text-image datasets, as the original `ldm.data.base` defined it."""

    def __init__(self, num_records: int = 0, valid_ids: Sequence[int] | None = None, size: int = 256) -> None:
        super().__init__()
        self.num_records = num_records
        self.valid_ids = valid_ids
        self.sample_ids = valid_ids
        self.size = size
        logger.info("%s dataset contains %d examples.", type(self).__name__, self.num_records)

    def __len__(self) -> int:
        """The number of records the stream holds."""
        return self.num_records

    @abstractmethod
    def __iter__(self):
        """Yield example dicts."""


def require_folder(path: Union[str, os.PathLike], owner: str, layout: str) -> Path:
    """`path` as a Path when it is a folder; otherwise one FileNotFoundError naming it and the expected layout."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{owner}: folder {path} not found; expected {layout}")
    return path


def read_file_list(list_file: Union[str, os.PathLike], owner: str, layout: str) -> list[str]:
    """The non-empty lines of a file list (relative paths); one clear error when it is missing or empty."""
    list_file = Path(list_file).expanduser()
    if not list_file.is_file():
        raise FileNotFoundError(f"{owner}: file list {list_file} not found; expected {layout}")
    lines = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{owner}: file list {list_file} is empty; expected {layout}")
    return lines
