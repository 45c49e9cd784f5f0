"""Image-text pairs from tar shards, as Stable Diffusion 2's training configs name them: `WebDataModuleFromConfig`.

    data:
      target: ldm.data.laion.WebDataModuleFromConfig
      params:
        tar_base: null            # prefix joined to every shard path (null: paths as given)
        batch_size: 8
        num_workers: 6
        multinode: true           # split the shards across processes
        min_size: 512             # metadata filters (see SampleFilter)
        max_pwatermark: 0.45
        p_unsafe_threshold: 0.1
        train:
          shards: ["/data/laion/{00000..18699}.tar", "pipe:aws s3 cp s3://bucket/{00000..00099}.tar -"]
          shuffle: 10000          # shuffle window in samples (0: the shards' order)
          image_key: jpg          # batch key of the image (read from .jpg, or .jpeg/.png/.webp when that is missing)
          image_transforms:       # torchvision transforms on the PIL image, as SD trained
            - {target: torchvision.transforms.Resize, params: {size: 512, interpolation: 3}}
            - {target: torchvision.transforms.RandomCrop, params: {size: 512}}
          postprocess: {target: ldm.data.laion.AddMask, params: {mode: 512train-large, p_drop: 0.25}}

Batches hold `<image_key>` (B x H x W x 3 float in [-1, 1]), the caption under `caption_key` (`txt`), the `json`
metadata, `__key__`, `__url__` and `__epoch__`; `rename: {jpg: image, txt: caption}` adds other names for the
built-in models. The order is deterministic and resumes mid-epoch (`ldm.data.shards`, `ldm.data.resumable`).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import io
import json
import logging
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import numpy as np
import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from webdataset.tariterators import base_plus_ext

from ldm.data.base import composite_on, resample_filter, resize_and_crop, to_model_array
from ldm.data.inpainting import MASK_KINDS, random_mask
from ldm.data.resumable import UNBOUNDED, ShardLoader
from ldm.data.shards import SampleRejected, ShardStream, collate_examples, expand_shards
from ldm.util import ConfigError, instantiate_from_config

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SPLIT_KEYS = ("shards", "shuffle", "shard_shuffle", "image_key", "caption_key", "image_transforms", "size",
              "random_crop", "interpolation", "postprocess", "rename", "epoch_length", "repeat")


def load_word_list(path: str, key: str = "filter_word_list") -> tuple[str, ...]:
    """Words from a YAML list (or mapping of lists) or a text file with one word per line."""
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: word list '{path}' does not exist (a YAML list or one word per line)")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError:
        loaded = None
    if isinstance(loaded, Mapping):
        words = [w for values in loaded.values() for w in (values or [])]
    elif isinstance(loaded, list):
        words = loaded
    else:
        words = text.splitlines()
    return tuple(sorted({str(w).strip().lower() for w in words if str(w).strip()}))


@dataclass
class SampleFilter:
    """Metadata filters, each active only when set and only where the sample has the field.

    `min_size`: both sides of the original image (json `original_width`/`original_height`, else `width`/`height`,
    else the decoded image) at least this; `max_aspect_ratio`: long side / short side at most this;
    `max_pwatermark`: `pwatermark` at most this; `p_unsafe_threshold`: drop samples with `punsafe` at or above it;
    `words`: drop captions containing one of these words (case-insensitive, whole words).
    """

    min_size: int | None = None
    max_aspect_ratio: float | None = None
    max_pwatermark: float | None = 1.0
    p_unsafe_threshold: float | None = None
    words: tuple[str, ...] = ()
    _pattern: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.words:
            self._pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in self.words) + r")\b", re.IGNORECASE)

    def check_metadata(self, meta: Mapping[str, Any], caption: str) -> None:
        """Raise SampleRejected (not corrupt) when watermark, safety or word filters drop the sample."""
        watermark, unsafe = _number(meta, "pwatermark"), _number(meta, "punsafe")
        if self.max_pwatermark is not None and watermark is not None and watermark > self.max_pwatermark:
            raise SampleRejected("pwatermark", corrupt=False)
        if self.p_unsafe_threshold is not None and unsafe is not None and unsafe >= self.p_unsafe_threshold:
            raise SampleRejected("punsafe", corrupt=False)
        if self._pattern is not None and self._pattern.search(caption):
            raise SampleRejected("filter_word_list", corrupt=False)

    def check_size(self, meta: Mapping[str, Any], decoded: tuple[int, int] | None) -> None:
        """Raise SampleRejected when the original image is too small or too elongated."""
        width = _number(meta, "original_width") or _number(meta, "width") or (decoded[0] if decoded else None)
        height = _number(meta, "original_height") or _number(meta, "height") or (decoded[1] if decoded else None)
        if width is None or height is None:
            return
        if self.min_size is not None and min(width, height) < self.min_size:
            raise SampleRejected("min_size", corrupt=False)
        if self.max_aspect_ratio is not None and max(width, height) > self.max_aspect_ratio * min(width, height):
            raise SampleRejected("max_aspect_ratio", corrupt=False)

    @property
    def needs_image_size(self) -> bool:
        """Whether size filters are set (they may need the decoded image)."""
        return self.min_size is not None or self.max_aspect_ratio is not None


def _number(meta: Mapping[str, Any], key: str) -> float | None:
    value = meta.get(key, meta.get(key.upper()))
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


@contextlib.contextmanager
def seeded_torch(seed: Sequence[int]) -> Iterator[None]:
    """A block in which torch's CPU generator is seeded by `seed` (restored afterwards): torchvision's random
    transforms then depend on the sample, not on what ran before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))
        yield


class ParquetMetadata:
    """Rows of the `<shard>.parquet` img2dataset writes beside a local `<shard>.tar`, by sample key."""

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._tables: OrderedDict[str, dict[str, dict[str, Any]]] = OrderedDict()

    def lookup(self, url: str, key: str) -> dict[str, Any]:
        """The row of `key` in the parquet beside shard `url` ({} when there is none)."""
        if url not in self._tables:
            self._tables[url] = self._load(url)
            while len(self._tables) > self.keep:
                self._tables.popitem(last=False)
        return self._tables[url].get(key, {})

    @staticmethod
    def _load(url: str) -> dict[str, dict[str, Any]]:
        path = os.path.splitext(url)[0] + ".parquet"
        if url.startswith("pipe:") or "://" in url or not os.path.isfile(path):
            return {}
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return {str(row["key"]): row for row in rows if "key" in row}


class SampleDecoder:
    """Raw tar sample -> example dict: decode, filter, transform (seeded), post-process."""

    def __init__(self, image_key: str = "jpg", caption_key: str = "txt", transforms: Sequence[Any] = (),
                 size: int | None = None, random_crop: bool = False, interpolation: str = "bicubic",
                 postprocess: Any = None, sample_filter: SampleFilter | None = None):
        self.image_key, self.caption_key = image_key, caption_key
        self.transforms = list(transforms)
        self.size, self.random_crop = size, bool(random_crop)
        self.resample = resample_filter(interpolation)
        self.postprocess = postprocess
        self._post_rng = postprocess is not None and "rng" in inspect.signature(postprocess.__call__).parameters
        self.filter = sample_filter or SampleFilter()
        self.parquet = ParquetMetadata()

    def __call__(self, raw: dict[str, Any], seed: list[int]) -> dict[str, Any]:
        meta = {**self.parquet.lookup(raw["__url__"], raw["__key__"]), **self._json(raw)}
        caption = self._caption(raw)
        self.filter.check_metadata(meta, caption)
        if self.filter.needs_image_size:
            self.filter.check_size(meta, None)
        image = self._image(raw)
        if self.filter.needs_image_size:
            self.filter.check_size(meta, image.size)
        with seeded_torch(seed):
            pixels = self._transform(image)
        example = {self.image_key: pixels, self.caption_key: caption, "json": meta}
        if self.postprocess is not None:
            if self._post_rng:
                example = self.postprocess(example, rng=np.random.default_rng(seed))
            else:
                example = self.postprocess(example)
        return example

    @staticmethod
    def _json(raw: dict[str, Any]) -> dict[str, Any]:
        if "json" not in raw:
            return {}
        try:
            meta = json.loads(raw["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SampleRejected(f"unreadable .json ({err})") from None
        if not isinstance(meta, dict):
            raise SampleRejected("the .json is not an object")
        return meta

    def _caption(self, raw: dict[str, Any]) -> str:
        if self.caption_key not in raw:
            raise SampleRejected(f"no .{self.caption_key} member (the caption)")
        try:
            return raw[self.caption_key].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise SampleRejected(f"the .{self.caption_key} caption is not UTF-8") from None

    def _image(self, raw: dict[str, Any]) -> Image.Image:
        ext = next((e for e in (self.image_key, *IMAGE_EXTENSIONS) if e in raw), None)
        if ext is None:
            raise SampleRejected(f"no image member (.{self.image_key}, {', '.join('.' + e for e in IMAGE_EXTENSIONS)})")
        try:
            with Image.open(io.BytesIO(raw[ext])) as image:
                image.load()
                return composite_on(image, (255, 255, 255))
        except Exception as err:  # noqa: BLE001 - any decoder failure means a corrupt sample
            raise SampleRejected(f"cannot decode .{ext}: {type(err).__name__}: {err}") from None

    def _transform(self, image: Image.Image) -> torch.Tensor:
        if self.size is not None:
            image = resize_and_crop(image, int(self.size), random_crop=self.random_crop, resample=self.resample)
        out: Any = image
        for transform in self.transforms:
            out = transform(out)
        if isinstance(out, Image.Image):
            return torch.from_numpy(to_model_array(out.convert("RGB")))
        if isinstance(out, torch.Tensor) and out.ndim == 3:  # a CHW tensor in [0, 1] (ToTensor in the list)
            return (out * 2.0 - 1.0).permute(1, 2, 0).contiguous().float()
        raise ConfigError(f"image_transforms must end with a PIL image or a CHW tensor, got {type(out).__name__}")


MASK_MODES = {"256train": "mixed", "256narrow": "brush", "512train": "mixed", "512train-large": "mixed",
              **{kind: kind for kind in MASK_KINDS}}


class AddMask:
    """Post-process for inpainting: adds `mask` (H x W x 1, 1 = fill in) and `masked_image` (the image, 0 where
    masked), drawn from boxes and brush strokes (`ldm.data.inpainting.random_mask`), the whole image with p_drop."""

    def __init__(self, mode: str = "512train", p_drop: float = 0.0, image_key: str = "jpg"):
        if mode not in MASK_MODES:
            raise ConfigError(f"AddMask: unknown mask generation mode '{mode}'; expected one of {sorted(MASK_MODES)}")
        if not 0.0 <= float(p_drop) <= 1.0:
            raise ConfigError(f"AddMask: p_drop={p_drop} must lie in [0, 1]")
        self.mode, self.kind, self.p_drop, self.image_key = mode, MASK_MODES[mode], float(p_drop), image_key

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, Any]:
        """The sample with `mask` and `masked_image` added (rng: the sample's seeded generator)."""
        rng = np.random.default_rng() if rng is None else rng
        image = torch.as_tensor(sample[self.image_key])
        mask = random_mask(image.shape[0], image.shape[1], rng, self.kind)
        if self.p_drop > 0 and rng.random() < self.p_drop:
            mask = np.ones_like(mask)
        mask_t = torch.from_numpy(mask[..., None])
        return {**sample, "mask": mask_t, "masked_image": image * (mask_t < 0.5)}


def count_samples(url: str) -> int | None:
    """Samples in a local shard: img2dataset's `<shard>_stats.json` successes, else the keys in the tar's index
    (None for pipe: and remote shards, whose size is unknown without reading them)."""
    if url.startswith("pipe:") or "://" in url:
        return None
    stats = os.path.splitext(url)[0] + "_stats.json"
    if os.path.isfile(stats):
        with open(stats, encoding="utf-8") as handle:
            successes = json.load(handle).get("successes")
        if isinstance(successes, int):
            return successes
    keys = set()
    try:
        with tarfile.open(url) as tar:
            for member in tar:
                if member.isreg():
                    keys.add(base_plus_ext(member.name)[0])
    except (OSError, tarfile.TarError):
        pass  # unreadable or truncated: the reader reports it; count what the index showed
    return len(keys)


def nominal_epoch_length(urls: Sequence[str], batch_size: int, readers: int) -> int:
    """Batches per process in one pass over the shards, or UNBOUNDED when a shard's size is unknown."""
    total = 0
    for url in urls:
        count = count_samples(url)
        if count is None:
            return UNBOUNDED
        total += count
    return max(1, total // (batch_size * readers))


def _plain(config: Any) -> Any:
    return OmegaConf.to_container(config, resolve=True) if isinstance(config, (DictConfig, ListConfig)) else config


class WebDataModuleFromConfig(pl.LightningDataModule):
    """Train/validation/test loaders over tar shards (see the module docstring for the config).

    The filters (`min_size`, `max_aspect_ratio`, `max_pwatermark`, `p_unsafe_threshold`, `filter_word_list`) apply
    to every split. `multinode` splits the shards across processes (False: one process only). `seed` fixes the shard
    permutations, shuffle windows and per-sample randomness. A split's `epoch_length` (batches per process) defaults
    to one pass over local shards, and to an unbounded epoch when a shard's size is unknown (pipe:, URLs).
    """

    def __init__(self, tar_base: str | None, batch_size: int, train: Any = None, validation: Any = None,
                 test: Any = None, num_workers: int = 4, multinode: bool = True, min_size: int | None = None,
                 max_pwatermark: float | None = 1.0, p_unsafe_threshold: float | None = None,
                 filter_word_list: str | None = None, max_aspect_ratio: float | None = None,
                 caption_key: str = "txt", seed: int = 0):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"data.params.batch_size must be a positive integer, got {batch_size!r}")
        self.tar_base, self.batch_size, self.num_workers = tar_base, batch_size, int(num_workers)
        self.multinode, self.caption_key, self.seed = bool(multinode), caption_key, int(seed)
        words = load_word_list(filter_word_list) if filter_word_list else ()
        self.sample_filter = SampleFilter(min_size=min_size, max_aspect_ratio=max_aspect_ratio,
                                          max_pwatermark=max_pwatermark, p_unsafe_threshold=p_unsafe_threshold,
                                          words=words)
        self.split_configs: dict[str, dict[str, Any]] = {}
        for split, config in (("train", train), ("validation", validation), ("test", test)):
            if config is not None:
                self.split_configs[split] = self._check_split(split, _plain(config))
        self.loaders: dict[str, ShardLoader] = {}
        for split, hook in (("train", "train_dataloader"), ("validation", "val_dataloader"),
                            ("test", "test_dataloader")):
            if split in self.split_configs:
                setattr(self, hook, self._hook(split))

    @staticmethod
    def _check_split(split: str, config: Any) -> dict[str, Any]:
        if not isinstance(config, dict) or "shards" not in config:
            raise ConfigError(f"data.params.{split}: expected a mapping with 'shards' (paths, brace patterns or pipe: "
                             f"commands), got {config!r}")
        unknown = sorted(set(config) - set(SPLIT_KEYS))
        if unknown:
            raise ConfigError(f"data.params.{split}: unknown key(s) {', '.join(unknown)}; accepted: "
                             f"{', '.join(SPLIT_KEYS)}")
        return config

    def _hook(self, split: str):
        def loader() -> ShardLoader:
            return self.make_loader(split)
        loader.__name__ = {"validation": "val_dataloader"}.get(split, f"{split}_dataloader")
        return loader

    def decoder(self, split: str) -> SampleDecoder:
        """The SampleDecoder of a split's config."""
        config, where = self.split_configs[split], f"data.params.{split}"
        transforms = [instantiate_from_config(t, path=f"{where}.image_transforms.{i}")
                      for i, t in enumerate(config.get("image_transforms") or [])]
        post = config.get("postprocess")
        return SampleDecoder(image_key=config.get("image_key", "jpg"),
                             caption_key=config.get("caption_key", self.caption_key), transforms=transforms,
                             size=config.get("size"), random_crop=config.get("random_crop", False),
                             interpolation=config.get("interpolation", "bicubic"),
                             postprocess=instantiate_from_config(post, path=f"{where}.postprocess") if post else None,
                             sample_filter=self.sample_filter)

    def make_loader(self, split: str, topology: tuple[int, int] | None = None) -> ShardLoader:
        """A fresh ShardLoader for `split` (training streams epoch after epoch; the others read one pass)."""
        config = self.split_configs[split]
        urls = expand_shards(config["shards"], self.tar_base, key=f"data.params.{split}.shards")
        train = split == "train"
        collate = functools.partial(collate_examples, rename=dict(config.get("rename") or {}))
        dataset = ShardStream(urls, self.decoder(split), self.batch_size, collate, seed=self.seed,
                              shuffle=config.get("shuffle", 0), shard_shuffle=config.get("shard_shuffle"),
                              repeat=config.get("repeat", train), split_by_rank=self.multinode)
        loader = ShardLoader(dataset, num_workers=self.num_workers, epoch_length=config.get("epoch_length"),
                             name=split, topology=topology)
        rank, world = loader.topology()
        if world > 1 and not self.multinode:
            raise ConfigError("data.params.multinode is false but the run has several processes; set multinode: true "
                             "so that they read different shards")
        if config.get("epoch_length") is None and dataset.repeat:
            loader.epoch_length = nominal_epoch_length(urls, self.batch_size, world if self.multinode else 1)
        logger.info("%s data: %d shards, %s batches of %d per process per epoch, %d stream(s)", split, len(urls),
                    "unbounded" if loader.epoch_length == UNBOUNDED else loader.epoch_length, self.batch_size,
                    loader.num_streams)
        self.loaders[split] = loader
        return loader
