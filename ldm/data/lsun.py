"""LSUN readers over extracted images and text file lists, with the original classes and parameters.

Layout as the original expected, relative to the working directory: `data/lsun/churches/` (images)
with `data/lsun/church_outdoor_train.txt` / `church_outdoor_val.txt` (one path relative to the image
folder per line); likewise `bedrooms/` + `bedrooms_{train,val}.txt` and `cats/` + `cat_{train,val}.txt`.
The environment variable `LDM_LSUN_ROOT` replaces `data/lsun`; `txt_file` / `data_root` override
either. Nothing is downloaded: export the LMDBs to image files and write the lists yourself.
Preprocessing follows score-sde (as the original): centre square crop, resize to `size`, random flip.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from torch.utils.data import Dataset

from ldm.data.base import crop_square, load_rgb, maybe_flip, resample_filter, to_model_array

logger = logging.getLogger(__name__)

ENV_ROOT = "LDM_LSUN_ROOT"


class LSUNBase(Dataset):
    """LSUN images listed in `txt_file` (paths relative to `data_root`), square-cropped and resized to `size`."""

    def __init__(
        self,
        txt_file: str,
        data_root: str,
        size: Optional[int] = None,
        interpolation: str = "bicubic",
        flip_p: float = 0.5,
    ) -> None:
        self.data_paths, self.data_root = str(txt_file), str(data_root)
        if not os.path.isfile(self.data_paths):
            raise FileNotFoundError(
                f"{type(self).__name__}: file list {self.data_paths} not found; expected one image path per line, "
                f"relative to {self.data_root} (export the LSUN LMDB to images there and write the list)"
            )
        if not os.path.isdir(self.data_root):
            raise FileNotFoundError(f"{type(self).__name__}: image folder {self.data_root} not found (listed by {self.data_paths})")
        with open(self.data_paths) as f:
            self.image_paths = [line.strip() for line in f if line.strip()]
        if not self.image_paths:
            raise ValueError(f"{type(self).__name__}: file list {self.data_paths} is empty")
        self._length = len(self.image_paths)
        self.labels = {
            "relative_file_path_": list(self.image_paths),
            "file_path_": [os.path.join(self.data_root, p) for p in self.image_paths],
        }
        self.size = size
        self.interpolation = resample_filter(interpolation)
        self.flip_p = float(flip_p)
        logger.info("%s: %d images listed in %s", type(self).__name__, self._length, self.data_paths)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = {key: values[index] for key, values in self.labels.items()}
        image = load_rgb(example["file_path_"])
        image = crop_square(image, min(image.size))
        if self.size is not None:
            image = image.resize((int(self.size), int(self.size)), resample=self.interpolation)
        example["image"] = to_model_array(maybe_flip(image, self.flip_p))
        return example


def _lsun_path(name: str) -> str:
    """`name` under $LDM_LSUN_ROOT, or under the original's relative `data/lsun`."""
    return str(Path(os.environ.get(ENV_ROOT, "data/lsun")) / name)


class _LSUNSplit(LSUNBase):
    """One category's split at its default paths; `txt_file`/`data_root` override them."""

    FOLDER = ""
    FILE_LIST = ""
    DEFAULT_FLIP_P = 0.5

    def __init__(self, txt_file: Optional[str] = None, data_root: Optional[str] = None, **kwargs: Any) -> None:
        kwargs.setdefault("flip_p", self.DEFAULT_FLIP_P)
        super().__init__(txt_file=txt_file or _lsun_path(self.FILE_LIST), data_root=data_root or _lsun_path(self.FOLDER), **kwargs)


class LSUNChurchesTrain(_LSUNSplit):
    """LSUN church_outdoor, training list."""

    FOLDER, FILE_LIST = "churches", "church_outdoor_train.txt"


class LSUNChurchesValidation(_LSUNSplit):
    """LSUN church_outdoor, validation list (no flips by default, as the original)."""

    FOLDER, FILE_LIST, DEFAULT_FLIP_P = "churches", "church_outdoor_val.txt", 0.0


class LSUNBedroomsTrain(_LSUNSplit):
    """LSUN bedrooms, training list."""

    FOLDER, FILE_LIST = "bedrooms", "bedrooms_train.txt"


class LSUNBedroomsValidation(_LSUNSplit):
    """LSUN bedrooms, validation list (no flips by default)."""

    FOLDER, FILE_LIST, DEFAULT_FLIP_P = "bedrooms", "bedrooms_val.txt", 0.0


class LSUNCatsTrain(_LSUNSplit):
    """LSUN cats, training list."""

    FOLDER, FILE_LIST = "cats", "cat_train.txt"


class LSUNCatsValidation(_LSUNSplit):
    """LSUN cats, validation list (no flips by default)."""

    FOLDER, FILE_LIST, DEFAULT_FLIP_P = "cats", "cat_val.txt", 0.0
