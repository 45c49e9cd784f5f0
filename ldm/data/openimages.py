"""Open Images V6 readers with the classes and parameters the published configs name:

- `FullOpenImagesTrain/Validation(size, crop_size)`: the first-stage autoencoders' data (`models/first_stage_models/*`):
  shorter side resized to `size`, then a `crop_size` crop (random for training, centred for validation);
- `SuperresOpenImagesAdvancedTrain/Validation(size, degradation, downscale_f, min_crop_f, max_crop_f, random_crop)`:
  the BSR super-resolution LDM's pairs (`models/ldm/bsr_sr`), made as `ldm.data.imagenet.ImageNetSR` makes them;
- `OpenImagesBBoxTrain/Validation(size)`: layout-to-image (`models/ldm/layout2img-openimages256`): images with
  `coordinates_bbox`, the token sequence of taming-transformers' ObjectsBoundingBoxConditionalBuilder that the
  published model reads (BERTEmbedder, vocab_size 8192, max_seq_len 92).

The original readers were never published; the layout is the Open Images V6 download as taming-transformers' Open
Images reader documents it, under `data/openimages` (or `$LDM_OPENIMAGES_ROOT`, or `data_root`):

    train/<ImageID>.jpg, validation/<ImageID>.jpg
    class-descriptions-boxable.csv                 LabelName,DisplayName (no header)
    oidv6-train-annotations-bbox.csv               ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,
    validation-annotations-bbox.csv                IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside (header)

`coordinates_bbox`, as the published config's builder (30 objects, 8192 tokens, crop encoded, group and additional
flags): the image's objects with area >= `min_object_area`, kept when there are `min_objects_per_image` ..
`max_objects_per_image`, shuffled, those meeting the crop kept; per object (category_no + n_classes x flags,
top-left token, bottom-right token), with coordinates in the full image on a 90 x 90 grid (token = y * 90 + x), padded
with 8191; then the crop's two corner tokens. `category_no` is the class's line in class-descriptions-boxable.csv,
or in `category_allow_list` (a list or a file of LabelNames) when given: the published checkpoint was trained on
taming's 300-class selection, which is not shipped here, so pass that list to sample with its numbering.
"""
from __future__ import annotations

import csv
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from ldm.data.base import (
    crop_square,
    load_rgb,
    maybe_flip,
    rand_int,
    require_folder,
    resize_and_crop,
    resize_shorter_side,
    to_model_array,
)
from ldm.data.imagenet import ImageNetSR

logger = logging.getLogger(__name__)

ENV_ROOT = "LDM_OPENIMAGES_ROOT"
SPLITS = {"train": ("train", "oidv6-train-annotations-bbox.csv"),
          "validation": ("validation", "validation-annotations-bbox.csv")}
CLASS_FILE = "class-descriptions-boxable.csv"
FULL_CROP = (0.0, 0.0, 1.0, 1.0)
_LAYOUT = (f"the Open Images V6 layout: train/ and validation/ with <ImageID>.jpg, {CLASS_FILE}, "
           "oidv6-train-annotations-bbox.csv and validation-annotations-bbox.csv; set data_root or "
           f"${ENV_ROOT} to that folder")


def openimages_root(data_root: Optional[str]) -> Path:
    """`data_root`, else $LDM_OPENIMAGES_ROOT, else the original's relative data/openimages."""
    return Path(data_root or os.environ.get(ENV_ROOT, "data/openimages")).expanduser()


def _split_folder(owner: str, root: Path, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"{owner}: split={split!r} is not one of {sorted(SPLITS)}")
    return require_folder(root / SPLITS[split][0], owner, _LAYOUT)


class OpenImagesFiles(Dataset):
    """The image files of one split, sorted by ImageID, as examples with `file_path_` (and `image` if processing)."""

    def __init__(self, split: str, data_root: Optional[str] = None, size: Optional[int] = None,
                 crop_size: Optional[int] = None, random_crop: bool = False, process_images: bool = True) -> None:
        owner = type(self).__name__
        self.folder = _split_folder(owner, openimages_root(data_root), split)
        self.paths = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not self.paths:
            raise FileNotFoundError(f"{owner}: no images in {self.folder}; expected {_LAYOUT}")
        if size is not None and crop_size is not None and crop_size > size:
            raise ValueError(f"{owner}: crop_size={crop_size} is larger than size={size}")
        self.size, self.crop_size, self.random_crop = size, crop_size, random_crop
        self.process_images = process_images
        logger.info("%s: %d images in %s", owner, len(self.paths), self.folder)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = {"file_path_": str(self.paths[index]), "image_id": self.paths[index].stem}
        if self.process_images:
            image = load_rgb(self.paths[index])
            if self.size:
                image = resize_shorter_side(image, int(self.size))
            if self.crop_size:
                image = crop_square(image, int(self.crop_size), random=self.random_crop)
            example["image"] = to_model_array(image)
        return example


class FullOpenImagesTrain(OpenImagesFiles):
    """Every training image: shorter side `size`, random `crop_size` crop."""

    def __init__(self, size: Optional[int] = None, crop_size: Optional[int] = None, data_root: Optional[str] = None,
                 random_crop: bool = True) -> None:
        super().__init__("train", data_root, size, crop_size, random_crop)


class FullOpenImagesValidation(OpenImagesFiles):
    """Every validation image: shorter side `size`, centred `crop_size` crop."""

    def __init__(self, size: Optional[int] = None, crop_size: Optional[int] = None, data_root: Optional[str] = None,
                 random_crop: bool = False) -> None:
        super().__init__("validation", data_root, size, crop_size, random_crop)


class SuperresOpenImagesAdvanced(ImageNetSR):
    """ImageNetSR's HR/LR pairs (crop fraction, resize, BSR degradation) over Open Images files."""

    def get_base(self, split: str, config: Any, data_root: Optional[str]) -> Dataset:
        """The Open Images split providing file paths."""
        return OpenImagesFiles(split, data_root=data_root, process_images=False)


class SuperresOpenImagesAdvancedTrain(SuperresOpenImagesAdvanced):
    """Super-resolution pairs from the training images."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(split="train", **kwargs)


class SuperresOpenImagesAdvancedValidation(SuperresOpenImagesAdvanced):
    """Super-resolution pairs from the validation images."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(split="validation", **kwargs)


# ---------------------------------------------------------------------------------------------- bounding boxes
@dataclass(frozen=True)
class BoxAnnotation:
    """One object: its class number, relative box (x0, y0, w, h) and the Open Images flags."""

    category_no: int
    bbox: tuple[float, float, float, float]
    is_group_of: bool = False
    is_occluded: bool = False
    is_depiction: bool = False
    is_inside: bool = False


class BoundingBoxTokens:
    """Objects and a crop as tokens (taming's ObjectsBoundingBoxConditionalBuilder): a `sections` x `sections` grid
    of `no_tokens` positions, the last token meaning 'none'."""

    def __init__(self, no_object_classes: int, no_max_objects: int = 30, no_tokens: int = 8192,
                 encode_crop: bool = True, use_group_parameter: bool = True,
                 use_additional_parameters: bool = True) -> None:
        self.no_object_classes, self.no_max_objects, self.no_tokens = no_object_classes, no_max_objects, no_tokens
        self.encode_crop = encode_crop
        self.use_group_parameter, self.use_additional_parameters = use_group_parameter, use_additional_parameters
        self.sections = int(math.sqrt(no_tokens))
        modifiers = 16 if use_additional_parameters else (2 if use_group_parameter else 1)
        if no_object_classes * modifiers > no_tokens - 1:
            raise ValueError(f"{no_object_classes} classes x {modifiers} flag combinations do not fit in "
                             f"{no_tokens - 1} tokens; pass a category_allow_list (the published model used 300)")

    @property
    def none(self) -> int:
        """The padding token."""
        return self.no_tokens - 1

    @property
    def embedding_dim(self) -> int:
        """The sequence length: 3 tokens per object, 2 for the crop."""
        return 3 * self.no_max_objects + (2 if self.encode_crop else 0)

    def tokenize_coordinates(self, x: float, y: float) -> int:
        """The grid token of a point in [0, 1]^2: y * sections + x, each rounded to the grid."""
        return round(y * (self.sections - 1)) * self.sections + round(x * (self.sections - 1))

    def token_pair_from_bbox(self, bbox: Sequence[float]) -> tuple[int, int]:
        """Tokens of the top-left and bottom-right corners."""
        x0, y0, w, h = bbox
        return self.tokenize_coordinates(x0, y0), self.tokenize_coordinates(x0 + w, y0 + h)

    def object_representation(self, ann: BoxAnnotation) -> int:
        """category_no + n_classes x (1 group, 2 occluded, 4 depiction, 8 inside)."""
        modifier = int(self.use_group_parameter and ann.is_group_of)
        if self.use_additional_parameters:
            modifier |= 2 * ann.is_occluded | 4 * ann.is_depiction | 8 * ann.is_inside
        return ann.category_no + self.no_object_classes * modifier

    def build(self, annotations: Sequence[BoxAnnotation], crop: Sequence[float] = FULL_CROP,
              flip: bool = False) -> torch.LongTensor:
        """The token sequence (embedding_dim,) of `annotations` (already in the order to use) seen through `crop`."""
        kept = [a for a in annotations[: self.no_max_objects] if _intersection(a.bbox, crop) > 0.0]
        frame = FULL_CROP if self.encode_crop else crop
        boxes = [_rescale(a.bbox, frame, flip) for a in kept]
        tokens: list[int] = []
        for ann, box in zip(kept, boxes):
            tokens += [self.object_representation(ann), *self.token_pair_from_bbox(box)]
        tokens += [self.none] * (3 * (self.no_max_objects - len(kept)))
        if self.encode_crop:
            crop = (1 - (crop[0] + crop[2]), crop[1], crop[2], crop[3]) if flip else tuple(crop)
            tokens += list(self.token_pair_from_bbox(crop))
        return torch.tensor(tokens, dtype=torch.long)


def _intersection(a: Sequence[float], b: Sequence[float]) -> float:
    """Overlap area of two (x0, y0, w, h) boxes."""
    dx = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    dy = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(0.0, dx) * max(0.0, dy)


def _rescale(bbox: Sequence[float], frame: Sequence[float], flip: bool) -> tuple[float, float, float, float]:
    """`bbox` in the coordinates of `frame`, clamped to it, mirrored when `flip`."""
    x0 = min(max((bbox[0] - frame[0]) / frame[2], 0.0), 1.0)
    y0 = min(max((bbox[1] - frame[1]) / frame[3], 0.0), 1.0)
    w, h = min(bbox[2] / frame[2], 1 - x0), min(bbox[3] / frame[3], 1 - y0)
    return (1 - (x0 + w) if flip else x0), y0, w, h


def _read_classes(path: Path, allow: Optional[Union[str, Sequence[str]]]) -> dict[str, int]:
    """LabelName -> category_no: the allow list's order when given, else the class file's."""
    if allow is not None:
        if isinstance(allow, str):
            allow_path = Path(allow).expanduser()
            if not allow_path.is_file():
                raise FileNotFoundError(f"category_allow_list file {allow_path} not found; expected one LabelName "
                                        "(e.g. /m/01g317) per line")
            allow = [line.strip() for line in allow_path.read_text().splitlines() if line.strip()]
        return {name: i for i, name in enumerate(allow)}
    if not path.is_file():
        raise FileNotFoundError(f"Open Images class file {path} not found; expected {_LAYOUT}")
    with open(path, newline="") as handle:
        names = [row[0] for row in csv.reader(handle) if row]
    return {name: i for i, name in enumerate(names)}


def read_box_annotations(path: Path, classes: dict[str, int], min_object_area: float
                         ) -> dict[str, list[BoxAnnotation]]:
    """Objects per ImageID from an Open Images box CSV, those of known classes with area >= min_object_area."""
    if not path.is_file():
        raise FileNotFoundError(f"Open Images annotations {path} not found; expected {_LAYOUT}")
    per_image: dict[str, list[BoxAnnotation]] = defaultdict(list)
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            w = float(row["XMax"]) - float(row["XMin"])
            h = float(row["YMax"]) - float(row["YMin"])
            if w * h < min_object_area or row["LabelName"] not in classes:
                continue
            per_image[row["ImageID"]].append(BoxAnnotation(
                classes[row["LabelName"]], (float(row["XMin"]), float(row["YMin"]), w, h),
                is_group_of=row["IsGroupOf"] == "1", is_occluded=row["IsOccluded"] == "1",
                is_depiction=row["IsDepiction"] == "1", is_inside=row["IsInside"] == "1"))
    return dict(per_image)


class OpenImagesBBox(Dataset):
    """Images of one split with `coordinates_bbox` tokens; training: a random square crop of at least `size`/the
    shorter side and random flips, validation: the centred square crop (the published config's 'random-2d' and
    'center'). Examples: `image` (size x size x 3 in [-1, 1]), `coordinates_bbox` (LongTensor of 92), `file_path_`,
    `crop_bbox`, `flipped`."""

    def __init__(self, split: str, size: int = 256, data_root: Optional[str] = None, random_crop: bool = False,
                 random_flip: bool = False, no_tokens: int = 8192, no_max_objects: int = 30,
                 min_object_area: float = 0.0001, min_objects_per_image: int = 2, max_objects_per_image: int = 30,
                 category_allow_list: Optional[Union[str, Sequence[str]]] = None, encode_crop: bool = True,
                 use_group_parameter: bool = True, use_additional_parameters: bool = True) -> None:
        owner = type(self).__name__
        root = openimages_root(data_root)
        self.folder = _split_folder(owner, root, split)
        if OmegaConf.is_config(category_allow_list):
            category_allow_list = list(category_allow_list)
        self.classes = _read_classes(root / CLASS_FILE, category_allow_list)
        annotations = read_box_annotations(root / SPLITS[split][1], self.classes, min_object_area)
        self.annotations = {image_id: anns for image_id, anns in sorted(annotations.items())
                            if min_objects_per_image <= len(anns) <= max_objects_per_image
                            and (self.folder / f"{image_id}.jpg").is_file()}
        if not self.annotations:
            raise FileNotFoundError(f"{owner}: no image in {self.folder} has {min_objects_per_image}.."
                                    f"{max_objects_per_image} annotated objects; expected {_LAYOUT}")
        self.image_ids = list(self.annotations)
        self.size, self.random_crop, self.flip_p = int(size), random_crop, 0.5 if random_flip else 0.0
        self.builder = BoundingBoxTokens(len(self.classes), no_max_objects, no_tokens, encode_crop,
                                         use_group_parameter, use_additional_parameters)
        logger.info("%s: %d images, %d classes, under %s", owner, len(self.image_ids), len(self.classes), root)

    def __len__(self) -> int:
        return len(self.image_ids)

    def _crop_box(self, width: int, height: int) -> tuple[int, int, int]:
        """(left, top, side) of the square crop."""
        largest = min(width, height)
        if not self.random_crop:
            return (width - largest) // 2, (height - largest) // 2, largest
        side = largest if largest <= self.size else self.size + rand_int(largest - self.size + 1)
        return rand_int(width - side + 1), rand_int(height - side + 1), side

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.image_ids[index]
        path = self.folder / f"{image_id}.jpg"
        image = load_rgb(path)
        width, height = image.size
        left, top, side = self._crop_box(width, height)
        image = image.crop((left, top, left + side, top + side))
        flipped = maybe_flip(image, self.flip_p)
        is_flipped = flipped is not image
        image = resize_and_crop(flipped, self.size)
        crop = (left / width, top / height, side / width, side / height)
        order = torch.randperm(len(self.annotations[image_id])).tolist()
        annotations = [self.annotations[image_id][i] for i in order]
        return {"image": to_model_array(image), "coordinates_bbox": self.builder.build(annotations, crop, is_flipped),
                "file_path_": str(path), "crop_bbox": torch.tensor(crop), "flipped": is_flipped}


class OpenImagesBBoxTrain(OpenImagesBBox):
    """Training split: random crops and flips."""

    def __init__(self, size: int = 256, **kwargs: Any) -> None:
        kwargs.setdefault("random_crop", True)
        kwargs.setdefault("random_flip", True)
        super().__init__("train", size=size, **kwargs)


class OpenImagesBBoxValidation(OpenImagesBBox):
    """Validation split: centred crops, no flips."""

    def __init__(self, size: int = 256, **kwargs: Any) -> None:
        super().__init__("validation", size=size, **kwargs)
