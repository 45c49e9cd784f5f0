"""A user's own folder of images: recursive, with captions and sub-folder classes.

Captions (`caption_source`): 'metadata' reads `metadata.jsonl` files (lines `{"file_name": ...,
"text": ...}`, paths relative to the jsonl's folder, as Hugging Face's imagefolder); 'txt' reads a side
file with the image's name and `.txt` (`cat.png` + `cat.txt`); 'filename' uses the file stem with `_`/`-`
as spaces; 'none' gives ''; 'auto' takes metadata, else the side file, else ''.
Classes: the first-level sub-folder names, sorted (`class_label` = index, `class_name`); images directly
under the root form the class ''. Files that cannot be opened are skipped when indexing (one warning
names them); a file that fails to decode later is logged and the next good example is returned instead.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from PIL import Image
from torch.utils.data import Dataset

from ldm.data.base import (
    IMAGE_EXTENSIONS,
    ColorSpec,
    list_image_files,
    load_rgb,
    maybe_flip,
    parse_rgb,
    resample_filter,
    resize_and_crop,
    split_indices,
    to_model_array,
    warn_skipped,
)

logger = logging.getLogger(__name__)

CAPTION_SOURCES = ("auto", "metadata", "txt", "filename", "none")


def read_metadata_captions(root: Path) -> dict[Path, str]:
    """Captions from every `metadata.jsonl` under `root`, keyed by resolved image path."""
    captions: dict[Path, str] = {}
    for meta in sorted(root.rglob("metadata.jsonl")):
        for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                name = record["file_name"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{meta}:{lineno}: expected a JSON object with 'file_name' and 'text'") from None
            text = record.get("text", record.get("caption", ""))
            captions[(meta.parent / name).resolve()] = str(text).strip()
    return captions


def _readable(path: Path) -> bool:
    """Whether PIL recognises `path` as an image (header check; full decoding happens at access)."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - touching the header is the check
        return True
    except Exception:  # noqa: BLE001 - any failure means unreadable
        return False


class ImageFolderDataset(Dataset):
    """Images under `root` as examples with `image`, `caption`, `class_label`, `class_name`, `relpath`.

    Each image is resized so its shorter side is `size`, then centre- or randomly cropped to a square
    (`random_crop`) and mirrored with probability `flip_p`; transparency is composited on `background`.
    `split` ('all', 'train', 'validation') selects a seeded hold-out of `val_fraction` of the files.
    """

    def __init__(
        self,
        root: str,
        size: int = 256,
        caption_source: str = "auto",
        random_crop: bool = False,
        flip_p: float = 0.0,
        interpolation: str = "bicubic",
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        background: ColorSpec = "white",
        split: str = "all",
        val_fraction: float = 0.05,
        seed: int = 0,
        check_files: bool = True,
    ) -> None:
        if caption_source not in CAPTION_SOURCES:
            raise ValueError(f"ImageFolderDataset: caption_source={caption_source!r} is not one of {CAPTION_SOURCES}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolderDataset: root folder {self.root} does not exist")
        files = list_image_files(self.root, extensions)
        if check_files:
            unreadable = [f for f in files if not _readable(f)]
            warn_skipped(f"ImageFolderDataset({self.root})", unreadable, "unreadable image")
            skipped = set(unreadable)
            files = [f for f in files if f not in skipped]
        if not files:
            raise FileNotFoundError(f"ImageFolderDataset: no readable images ({', '.join(extensions)}) under {self.root}")
        self.size, self.random_crop, self.flip_p = int(size), bool(random_crop), float(flip_p)
        self.resample = resample_filter(interpolation)
        self.background = parse_rgb(background, "background")
        self.caption_source = caption_source
        self.class_names = sorted({self._class_of(f) for f in files})
        chosen = split_indices(len(files), split, float(val_fraction), int(seed))
        self.files = [files[i] for i in chosen]
        self.captions = self._captions(self.files)
        self._bad: set[Path] = set()
        logger.info("ImageFolderDataset: %d images, %d classes (split=%s) under %s", len(self.files), len(self.class_names), split, self.root)

    def _class_of(self, path: Path) -> str:
        """The first-level sub-folder of `path` under the root ('' for top-level files)."""
        parts = path.relative_to(self.root).parts
        return parts[0] if len(parts) > 1 else ""

    def _captions(self, files: list[Path]) -> list[str]:
        """The caption of every file per `caption_source`."""
        source = self.caption_source
        metadata = read_metadata_captions(self.root) if source in ("auto", "metadata") else {}
        captions = []
        for path in files:
            caption = ""
            if source in ("auto", "metadata"):
                caption = metadata.get(path.resolve(), "")
            if source == "txt" or (source == "auto" and not caption and path.with_suffix(".txt").is_file()):
                side = path.with_suffix(".txt")
                caption = side.read_text(encoding="utf-8").strip() if side.is_file() else ""
            elif source == "filename":
                caption = path.stem.replace("_", " ").replace("-", " ").strip()
            captions.append(caption)
        missing = [f for f, c in zip(files, captions) if not c]
        if source in ("metadata", "txt") and missing:
            warn_skipped(f"ImageFolderDataset({self.root})", missing, f"caption-less ({source}, using '')")
        return captions

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> Optional[Image.Image]:
        """The processed image of example `index`, or None (logged once per file) if it fails to decode."""
        path = self.files[index]
        try:
            image = load_rgb(path, self.background)
        except Exception as err:  # noqa: BLE001 - a broken file must not end a run
            if path not in self._bad:
                self._bad.add(path)
                logger.warning("ImageFolderDataset: cannot decode %s (%s); using the next image instead", path, err)
            return None
        image = resize_and_crop(image, self.size, random_crop=self.random_crop, resample=self.resample)
        return maybe_flip(image, self.flip_p)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            image = self._load(i)
            if image is not None:
                break
        else:
            raise RuntimeError(f"ImageFolderDataset: none of the {len(self.files)} images under {self.root} can be decoded")
        path = self.files[i]
        class_name = self._class_of(path)
        return {
            "image": to_model_array(image),
            "caption": self.captions[i],
            "class_label": self.class_names.index(class_name),
            "class_name": class_name,
            "relpath": path.relative_to(self.root).as_posix(),
            "file_path_": str(path),
        }


class ImageFolderTrain(ImageFolderDataset):
    """The training part of a seeded split of an image folder (random crops and flips by default)."""

    def __init__(self, root: str, random_crop: bool = True, flip_p: float = 0.5, **kwargs: Any) -> None:
        super().__init__(root, random_crop=random_crop, flip_p=flip_p, split="train", **kwargs)


class ImageFolderValidation(ImageFolderDataset):
    """The held-out part of a seeded split of an image folder (centre crops, no flips)."""

    def __init__(self, root: str, **kwargs: Any) -> None:
        super().__init__(root, split="validation", **kwargs)
