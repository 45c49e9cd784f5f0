"""ImageNet (ILSVRC2012) readers over class folders on disk, with the original classes and config keys.

Layout: a split folder holding one sub-folder per synset (`n01440764/*.JPEG`, ...), the validation
images sorted into synset folders like the training ones. Where the split folder is looked up,
first match wins:

1. `config.root` (or the `data_root` argument): the split folder itself, or a folder holding
   `train/` and `val/` (or the original `ILSVRC2012_train/data`, `ILSVRC2012_validation/data`);
2. the environment variable `LDM_IMAGENET_ROOT`, read the same way;
3. the original default `$XDG_CACHE_HOME/autoencoders/data/ILSVRC2012_{train,validation}/data`.

Nothing is downloaded. A synset→name file (`synset_human.txt` or Kaggle's `LOC_synset_mapping.txt`,
lines `n01440764 tench, Tinca tinca`) next to the split folder or one/two levels up fills `human_label`.
Config keys (`config:` in the published YAML): `size`, `random_crop` (also the original
nested `ImageNetTrain: {random_crop: ...}`), `sub_indices`, `keep_orig_class_label`.

The ImageNet class index (`index_synset.yaml`, lines `0: n01440764` ... `999: n15075141`, the file the original
ships in data/) is read from the split folder's parent (where the original downloaded it) or else from this
repository's `data/index_synset.yaml`. As in the original, `sub_indices` are ImageNet class indices, and
`keep_orig_class_label` gives every image its ImageNet index; otherwise labels count the synsets present (after
`sub_indices`) in sorted order.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from omegaconf import OmegaConf
from torch.utils.data import Dataset, Subset

import yaml

from ldm.data.base import crop_square, load_rgb, rand_uniform, resize_and_crop, resize_shorter_side, to_model_array
from ldm.modules.image_degradation import make_degradation

logger = logging.getLogger(__name__)

ENV_ROOT = "LDM_IMAGENET_ROOT"
_HUMAN_FILES = ("synset_human.txt", "LOC_synset_mapping.txt")
_EXTENSIONS = (".jpeg", ".jpg", ".png")
_PREPARE_HINT = (
    "extract ILSVRC2012 into one folder per synset (n01440764/...JPEG; validation images sorted into "
    f"synset folders too) and point config.root or ${ENV_ROOT} at it"
)


def _cache_dir() -> Path:
    """The original's cache root: $XDG_CACHE_HOME or ~/.cache."""
    return Path(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")))


def _parse_sub_indices(spec: Any) -> list[int]:
    """Class indices from a list or a string like '0-9,20,35-37'."""
    if isinstance(spec, (list, tuple)) or OmegaConf.is_list(spec):
        return [int(i) for i in spec]
    indices: list[int] = []
    for part in str(spec).split(","):
        start, _, end = part.strip().partition("-")
        indices.extend(range(int(start), int(end or start) + 1))
    return indices


INDEX_FILE = "index_synset.yaml"
SHIPPED_INDEX = Path(__file__).resolve().parents[2] / "data" / INDEX_FILE


def read_synset_index(path: Optional[os.PathLike] = None) -> dict[int, str]:
    """ImageNet class index -> synset id from an index_synset.yaml (default: the one this repository ships)."""
    path = Path(path) if path is not None else SHIPPED_INDEX
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet class index {path} not found; expected lines '0: n01440764' ... "
                                "'999: n15075141' (data/index_synset.yaml of the repository)")
    index = yaml.safe_load(path.read_text())
    if not isinstance(index, dict) or not all(isinstance(k, int) and isinstance(v, str) for k, v in index.items()):
        raise ValueError(f"ImageNet class index {path}: expected a mapping of integers to synset ids")
    return index


def synset2idx(path_to_yaml: Optional[os.PathLike] = None) -> dict[str, int]:
    """Synset id -> ImageNet class index (the original's helper)."""
    return {synset: i for i, synset in read_synset_index(path_to_yaml).items()}


def read_synset_names(path: Path) -> dict[str, str]:
    """A synset id → human-readable name map from lines like 'n01440764 tench, Tinca tinca'."""
    names = {}
    for line in path.read_text().splitlines():
        if line.strip():
            synset, _, human = line.strip().partition(" ")
            names[synset] = human.strip()
    return names


class ImageNetBase(Dataset):
    """ILSVRC2012 images of one split with `class_label`, `synset`, `human_label`, `relpath` metadata."""

    NAME = "ILSVRC2012"
    SPLIT_DIRS: tuple[str, ...] = ()
    DEFAULT_RANDOM_CROP = False

    def __init__(self, config: Any = None, process_images: bool = True, data_root: Optional[str] = None) -> None:
        config = OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else dict(config or {})
        self.config = config
        self.process_images = process_images
        self.size = config.get("size")
        # The original read `ImageNetTrain/random_crop`: a nested key under the class name.
        legacy = config.get(type(self).__name__) or {}
        self.random_crop = bool(config.get("random_crop", legacy.get("random_crop", self.DEFAULT_RANDOM_CROP)))
        self.datadir = self._find_datadir(config.get("root") or data_root)
        self._index(config)

    def _find_datadir(self, root: Optional[str]) -> Path:
        """The split folder (holding synset folders), searched as the module docstring lists."""
        base = root or os.environ.get(ENV_ROOT)
        if base:
            base = Path(base).expanduser()
            candidates = [base / d for d in self.SPLIT_DIRS] + [base / self.NAME / "data", base]
            where = f"config.root/data_root {root}" if root else f"${ENV_ROOT}={base}"
        else:
            candidates = [_cache_dir() / "autoencoders" / "data" / self.NAME / "data"]
            where = f"the default location (set config.root or ${ENV_ROOT} to use another)"
        for path in candidates:
            if path.is_dir() and any(p.is_dir() and p.name.startswith("n") for p in path.iterdir()):
                return path
        raise FileNotFoundError(
            f"{type(self).__name__}: no ImageNet synset folders at {' or '.join(map(str, candidates))} "
            f"(from {where}); {_PREPARE_HINT}"
        )

    def _list_relpaths(self) -> list[str]:
        """Relative image paths: from `filelist.txt` beside the split folder if present, else by scanning."""
        filelist = self.datadir.parent / "filelist.txt"
        if filelist.is_file():
            return sorted(line.strip() for line in filelist.read_text().splitlines() if line.strip())
        relpaths = []
        for synset_dir in sorted(p for p in self.datadir.iterdir() if p.is_dir()):
            relpaths += [f"{synset_dir.name}/{f.name}" for f in sorted(synset_dir.iterdir()) if f.suffix.lower() in _EXTENSIONS]
        return relpaths

    def _find_human_names(self) -> dict[str, str]:
        """The synset → name map if a known file lies near the split folder, else {}."""
        for folder in (self.datadir, self.datadir.parent, self.datadir.parent.parent):
            for name in _HUMAN_FILES:
                if (folder / name).is_file():
                    return read_synset_names(folder / name)
        return {}

    def _find_synset_index(self) -> Optional[Path]:
        """An index_synset.yaml beside the data (the original's download place), or None for the shipped one."""
        for folder in (self.datadir.parent, self.datadir.parent.parent):
            if (folder / INDEX_FILE).is_file():
                return folder / INDEX_FILE
        return None

    def _index(self, config: dict) -> None:
        """Build the per-image label lists, honouring `sub_indices` and `keep_orig_class_label`."""
        relpaths = self._list_relpaths()
        if not relpaths:
            raise FileNotFoundError(f"{type(self).__name__}: no images (.JPEG/.png) in the synset folders of {self.datadir}; {_PREPARE_HINT}")
        human = self._find_human_names()
        index = synset2idx(self._find_synset_index())
        if config.get("sub_indices") is not None:
            by_index = {i: synset for synset, i in index.items()}
            wanted = {by_index[i] for i in _parse_sub_indices(config["sub_indices"]) if i in by_index}
            relpaths = [p for p in relpaths if p.split("/")[0] in wanted]
            if not relpaths:
                raise FileNotFoundError(f"{type(self).__name__}: none of the classes sub_indices={config['sub_indices']}"
                                        f" has images in {self.datadir}")
        present = sorted({p.split("/")[0] for p in relpaths})
        if config.get("keep_orig_class_label", False):
            unknown = [s for s in present if s not in index]
            if unknown:
                raise ValueError(f"{type(self).__name__}: keep_orig_class_label: synsets {unknown[:5]} are not in "
                                 f"the ImageNet class index {self._find_synset_index() or SHIPPED_INDEX}")
            synset_to_label = index
        else:
            synset_to_label = {s: i for i, s in enumerate(present)}
        self.relpaths = relpaths
        self.synsets = [p.split("/")[0] for p in relpaths]
        self.class_labels = [synset_to_label[s] for s in self.synsets]
        self.human_labels = [human.get(s, "") for s in self.synsets]
        logger.info("%s: %d images in %d classes from %s", type(self).__name__, len(relpaths), len(set(self.synsets)), self.datadir)

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = {
            "relpath": self.relpaths[index],
            "synset": self.synsets[index],
            "synsets": self.synsets[index],  # the original's key
            "class_label": self.class_labels[index],
            "human_label": self.human_labels[index],
            "file_path_": str(self.datadir / self.relpaths[index]),
        }
        if self.process_images:
            image = load_rgb(example["file_path_"])
            if self.size:
                image = resize_and_crop(image, int(self.size), random_crop=self.random_crop)
            example["image"] = to_model_array(image)
        return example


class ImageNetTrain(ImageNetBase):
    """ILSVRC2012 training split (random crops by default)."""

    NAME = "ILSVRC2012_train"
    SPLIT_DIRS = ("train",)
    DEFAULT_RANDOM_CROP = True


class ImageNetValidation(ImageNetBase):
    """ILSVRC2012 validation split, images sorted into synset folders (centre crops by default)."""

    NAME = "ILSVRC2012_validation"
    SPLIT_DIRS = ("val", "validation")


class ImageNetSR(Dataset):
    """Super-resolution pairs: `image` (HR, `size`²) and `LR_image` (`size / downscale_f`²), both in [-1, 1].

    A square crop of side uniform(min_crop_f, max_crop_f) × the shorter side is taken (random or
    centred), resized to `size`, then degraded. `split` picks the ImageNet split; `config`/`data_root`
    are passed to it; `indices` optionally restricts it (the original used a pickled HR index list).
    """

    def __init__(
        self,
        size: Optional[int] = None,
        degradation: Optional[str] = None,
        downscale_f: int = 4,
        min_crop_f: float = 0.5,
        max_crop_f: float = 1.0,
        random_crop: bool = True,
        split: str = "train",
        config: Any = None,
        data_root: Optional[str] = None,
        indices: Optional[Sequence[int]] = None,
    ) -> None:
        if not size or size % downscale_f:
            raise ValueError(f"ImageNetSR: size={size} must be set and divisible by downscale_f={downscale_f}")
        if not 0 < min_crop_f <= max_crop_f <= 1.0:
            raise ValueError(f"ImageNetSR: expected 0 < min_crop_f ({min_crop_f}) <= max_crop_f ({max_crop_f}) <= 1")
        self.degradation_process = make_degradation(degradation, int(downscale_f), key="ImageNetSR: degradation")
        self.size, self.LR_size, self.degradation = int(size), int(size) // int(downscale_f), degradation
        self.min_crop_f, self.max_crop_f, self.center_crop = min_crop_f, max_crop_f, not random_crop
        self.base = self.get_base(split, config, data_root)
        if indices is not None:
            self.base = Subset(self.base, list(indices))

    def get_base(self, split: str, config: Any, data_root: Optional[str]) -> Dataset:
        """The ImageNet split providing file paths (images are decoded here, not there)."""
        cls = {"train": ImageNetTrain, "validation": ImageNetValidation}.get(split)
        if cls is None:
            raise ValueError(f"ImageNetSR: split={split!r} is not 'train' or 'validation'")
        return cls(config=config, process_images=False, data_root=data_root)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = dict(self.base[index])
        image = load_rgb(example["file_path_"])
        side = int(min(image.size) * rand_uniform(self.min_crop_f, self.max_crop_f))
        image = crop_square(image, max(side, 1), random=not self.center_crop)
        image = resize_shorter_side(image, self.size)
        example["image"] = to_model_array(image)
        example["LR_image"] = to_model_array(self.degradation_process(np.asarray(image)))
        return example


class ImageNetSRTrain(ImageNetSR):
    """`ImageNetSR` over the training split."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(split="train", **kwargs)


class ImageNetSRValidation(ImageNetSR):
    """`ImageNetSR` over the validation split."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(split="validation", **kwargs)
