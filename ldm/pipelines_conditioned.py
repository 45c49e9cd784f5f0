"""The image tasks conditioned on maps and images, beside `ldm.pipelines`' Txt2Img / Img2Img / Inpaint / SuperRes
(and served from there): layout-to-image and semantic synthesis (`MapToImage`, scripts/sample_conditional.py), SD 2
depth-to-image (`Depth2Img`, scripts/depth2img.py) and SD 2.1 unCLIP image variations (`ImageVariations`,
scripts/unclip.py). Same contract as `ldm.pipelines`: making a task checks its settings (one ScriptError naming the
flag), calling it samples one batch with per-sample seeds and returns `Samples` with each image's PNG metadata.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm import inference as inf
from ldm.pipelines import (
    Img2Img,
    Progress,
    SampledTask,
    Samples,
    _decoded,
    fit_to_multiple,
    map_kind,
    step_callback,
)
from ldm.sampling.noise import SeededNoise


# ----------------------------------------------------------------------------------------- layout / semantic maps
def read_layout(path: str, builder: Any, flag: str = "--layout") -> list[torch.Tensor]:
    """The layouts of a JSON file as token sequences: one layout (a list of objects) or a list of layouts; an object
    is {"class": name or number, "bbox": [x0, y0, w, h]} in [0, 1] image coordinates (names: the builder's
    category_names)."""
    import json

    if builder is None:
        raise inf.ScriptError(f"{flag}: the model has no bbox_tokenizer_config to read layouts with; use --from-data")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise inf.ScriptError(f"{flag}: layout file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise inf.ScriptError(f"{flag}: '{path}' is not a JSON file ({type(err).__name__}: {err})") from None
    layouts = data if data and all(isinstance(item, list) for item in data) else [data]
    names = {name: i for i, name in enumerate(getattr(builder, "category_names", None) or [])}
    out = []
    for layout in layouts:
        try:
            objects = [(names[obj["class"]] if isinstance(obj["class"], str) else int(obj["class"]),
                        tuple(float(v) for v in obj["bbox"])) for obj in layout]
            if any(len(box) != 4 for _, box in objects):
                raise ValueError("a bbox has 4 numbers: x0, y0, w, h")
            out.append(builder.build(objects))
        except (KeyError, TypeError, ValueError) as err:
            known = ", ".join(list(names)[:4]) + (", ..." if len(names) > 4 else "")
            raise inf.ScriptError(f"{flag}: '{path}' holds no layout the model reads ({type(err).__name__}: {err}); "
                                  f'expected [{{"class": <{known or "class number"}>, "bbox": [x0, y0, w, h]}}, ...]'
                                  ) from None
    if not out:
        raise inf.ScriptError(f"{flag}: '{path}' holds no layout")
    return out


def read_segmentation(path: str, n_labels: int, multiple: int, flag: str = "--segmentation") -> torch.Tensor:
    """A label-map image (one label index per pixel, a grayscale or palette PNG) as a one-hot (1, H, W, n_labels)
    float tensor; labels outside [0, n_labels) and sides that are not multiples of `multiple` are user errors."""
    if not os.path.isfile(path):
        raise inf.ScriptError(f"{flag}: label map '{path}' does not exist")
    try:
        with Image.open(path) as image:
            labels = torch.from_numpy(np.asarray(image if image.mode in ("L", "P", "I") else image.convert("L"))
                                      .astype(np.int64))
    except (OSError, ValueError) as err:
        raise inf.ScriptError(f"{flag}: '{path}' is not a readable image ({type(err).__name__})") from None
    if labels.ndim != 2 or labels.min() < 0 or labels.max() >= n_labels:
        raise inf.ScriptError(f"{flag}: '{path}' holds labels {int(labels.min())}..{int(labels.max())}; the model "
                              f"reads label maps with values in [0, {n_labels})")
    if labels.shape[0] % multiple or labels.shape[1] % multiple:
        raise inf.ScriptError(f"{flag}: '{path}' is {labels.shape[1]}x{labels.shape[0]}; both sides must be "
                              f"multiples of {multiple}, the model's downsampling factor")
    return F.one_hot(labels, n_labels).float()[None]


@dataclass
class MapToImage(SampledTask):
    """Layout-to-image and semantic synthesis (scripts/sample_conditional.py): latents sampled from per-sample seeded
    noise, conditioned on a bounding-box layout (token sequences, cross-attention; `height` x `width` pixels, any
    multiple of the model's factor, also beyond the training size) or on a label map (one-hot, concatenated at
    the latent size its cond stage gives). No guidance by default (the originals trained no null layout or map)."""

    scale: float = 1.0
    height: int = 16
    width: int = 16

    @staticmethod
    def supports(model: Any) -> bool:
        """Models conditioned on coordinates_bbox layouts or segmentation maps."""
        return map_kind(model) is not None

    def __post_init__(self) -> None:
        self.kind = map_kind(self.model)
        if self.kind is None:
            raise inf.ScriptError(f"the model of '{self.ckpt}' is conditioned on "
                                  f"{getattr(self.model, 'cond_stage_key', None)!r}, not on a layout "
                                  "(coordinates_bbox) or a label map (segmentation)")
        if self.scale != 1.0:
            raise inf.ScriptError(f"--scale {self.scale}: layout and label-map models have no unconditional "
                                  "conditioning to guide with; use --scale 1")
        if self.kind == "layout":
            inf.check_size(self.height, self.width, inf.image_multiple(self.model))
        self.prepare_sampler()
        self.common = inf.sample_metadata(**self.sampler_metadata(), checkpoint=self.label)

    @property
    def key(self) -> str:
        """The batch key the model's cond stage reads."""
        return self.model.cond_stage_key

    @property
    def n_labels(self) -> int:
        """How many labels a semantic model's one-hot maps have (its SpatialRescaler's input channels, else the
        UNet's concatenated channels)."""
        mapper = getattr(self.model.cond_stage_model, "channel_mapper", None)
        if mapper is not None:
            return mapper.in_channels
        return self.model.model.diffusion_model.in_channels - self.model.channels

    def read_inputs(self, layout: str | None = None, segmentation: Sequence[str] | None = None) -> torch.Tensor:
        """The conditioning inputs of a --layout JSON file (token sequences [B, L]) or --segmentation label-map
        images (one-hot [B, H, W, n_labels], all of one size); the wrong kind for the model is one error."""
        if layout:
            if self.kind != "layout":
                raise inf.ScriptError("--layout: the model reads label maps; use --segmentation")
            return torch.stack(read_layout(layout, getattr(self.model, "bbox_tokenizer", None)))
        if not segmentation:
            raise inf.ScriptError(f"--{'layout' if self.kind == 'layout' else 'segmentation'}: no input given")
        if self.kind != "semantic":
            raise inf.ScriptError("--segmentation: the model reads layouts; use --layout")
        maps = [read_segmentation(path, self.n_labels, inf.image_multiple(self.model)) for path in segmentation]
        if len({m.shape for m in maps}) > 1:
            raise inf.ScriptError("--segmentation: the label maps differ in size; give maps of one size per call")
        return torch.cat(maps)

    def sample_each(self, inputs: torch.Tensor, first_seed: int, n_samples: int,
                    progress: Progress | None = None) -> Iterator[Samples]:
        """`n_samples` images of every input in turn, input i with seeds first_seed + i * n_samples, ... (as
        scripts/sample_conditional.py numbers them)."""
        for i, value in enumerate(inputs):
            seeds = inf.sample_seeds(first_seed + i * n_samples, n_samples)
            yield self(value[None].expand(n_samples, *value.shape), seeds, progress)

    def describe(self, value: torch.Tensor) -> str:
        """One conditioning input as PNG metadata: a layout's objects read back, or a label map's label counts."""
        if self.kind == "semantic":
            counts = value.reshape(-1, value.shape[-1]).sum(0).long().tolist()
            return " ".join(f"{label}:{count}" for label, count in enumerate(counts) if count)
        reader = getattr(self.model, "bbox_tokenizer", None)
        if reader is None:
            return " ".join(str(int(t)) for t in value)
        objects, _ = reader.inverse_build(value)
        return "; ".join(f"{reader.label(obj.category_no)} @ " + ",".join(f"{v:.2f}" for v in box)
                         for obj, box in objects)

    def __call__(self, inputs: torch.Tensor, seeds: Sequence[int], progress: Progress | None = None) -> Samples:
        """One image per conditioning input (a batch of layouts [B, L] or one-hot maps [B, H, W, n]), input i drawn
        with seeds[i]."""
        with self.context():
            c = self.model.get_conditioning({self.key: inputs.to(self.model.device)})
            factor = inf.first_stage_factor(self.model)
            size = (self.height // factor, self.width // factor) if self.kind == "layout" else tuple(
                c["concat"].shape[-2:])
            images = _decoded(self.model, self.sample(c, None, (self.model.channels, *size), seeds, progress))
        return Samples(images, [inf.sample_metadata(seed=s, **{self.kind: self.describe(v)}, **self.common)
                                for v, s in zip(inputs.cpu(), seeds)])


# ----------------------------------------------------------------------------------------- depth-to-image
def depth_to_concat(depth: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A depth map [B, 1, H, W] as the depth model's concat input: bicubic to the latent `size`, normalised per sample
    to [-1, 1] (as LatentDepth2ImageDiffusion's conditioning; a flat map gives -1)."""
    depth = F.interpolate(depth.float(), size=tuple(size), mode="bicubic", align_corners=False)
    lo, hi = depth.amin(dim=(1, 2, 3), keepdim=True), depth.amax(dim=(1, 2, 3), keepdim=True)
    return 2.0 * (depth - lo) / (hi - lo + 0.001).clamp_min(torch.finfo(depth.dtype).tiny) - 1.0


@dataclass
class Depth2Img(Img2Img):
    """SD 2 depth-to-image (scripts/depth2img.py): Img2Img whose UNet also reads the depth of the init image — from
    the model's MiDaS depth stage, or `depth_image` (a grayscale image, brighter = nearer) — at the latent size,
    normalised to [-1, 1]; the guidance's unconditional side keeps the depth, as SD 2's depth2img."""

    depth_image: Image.Image | None = None
    depth_path: str | None = None
    strength: float = 0.8
    scale: float = 9.0

    @staticmethod
    def supports(model: Any) -> bool:
        """LatentDepth2ImageDiffusion models (a depth stage whose output is concatenated)."""
        return hasattr(model, "depth_model") and hasattr(model, "depth_stage_key") and inf.is_text_model(model)

    def __post_init__(self) -> None:
        if not self.supports(self.model):
            raise inf.ScriptError(f"the model of '{self.ckpt}' is not a depth-to-image model "
                                  "(LatentDepth2ImageDiffusion with a text cond stage)")
        super().__post_init__()
        latent = tuple(self.z_init.shape[-2:])
        with self.context():
            if self.depth_image is not None:
                depth = self.depth_image.convert("L").resize(self.size, Image.Resampling.BICUBIC)
                raw = torch.from_numpy(np.asarray(depth, dtype=np.float32))[None, None].to(self.model.device)
                self.depth = depth_to_concat(raw, latent)
                self.common["depth_image"] = os.path.basename(self.depth_path or "depth.png")
            else:
                if not hasattr(self.model.depth_model, "model_type"):
                    raise inf.ScriptError(f"--depth-img: the depth stage of '{self.ckpt}' is "
                                          f"{type(self.model.depth_model).__name__}, not MiDaS; give the depth as an "
                                          "image")
                init = fit_to_multiple(self.image, inf.image_multiple(self.model), "--init-img", self.image_path)
                self.depth = self.model.task_roles({self.model.depth_stage_key: self.midas_input(init)}, latent)[
                    "concat"]
                self.common["depth"] = f"midas {self.model.depth_model.model_type}"

    def midas_input(self, image: Image.Image) -> torch.Tensor:
        """The image prepared for the model's MiDaS network (ldm.data.util.AddMiDaS), [1, 3, h, w]."""
        from ldm.data.util import AddMiDaS

        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        midas_in = AddMiDaS(self.model.depth_model.model_type)({"jpg": pixels})["midas_in"]
        return torch.from_numpy(np.ascontiguousarray(midas_in))[None].to(self.model.device)

    def renoise_and_denoise(self, z0: torch.Tensor, c: Any, uc: Any, seeds: Sequence[int],
                            progress: Progress | None = None) -> torch.Tensor:
        """Img2Img's renoising; at strength 1 every step from per-sample seeded noise (SD 2's full sample)."""
        if self.strength < 1.0:
            return super().renoise_and_denoise(z0, c, uc, seeds, progress)
        noise = SeededNoise(seeds, z0.device).randn(z0.shape)
        return self._sampler.decode(noise, c, self.t_enc, unconditional_guidance_scale=self.scale,
                                    unconditional_conditioning=uc, callback=step_callback(progress, self.t_enc))

    def depth_preview(self) -> torch.Tensor:
        """The depth the UNet reads, (1, 3, h, w) in [-1, 1] at the latent size (for showing it)."""
        return self.depth.detach().float().cpu().expand(-1, 3, -1, -1)

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int], progress: Progress | None = None) -> Samples:
        """One depth-guided edit of the image per prompt, prompt i with seeds[i]."""
        with self.context():
            c, uc = self.conditioning(prompts)
            depth = {"concat": self.depth.expand(len(prompts), *self.depth.shape[1:])}
            c, uc = {**c, **depth}, None if uc is None else {**uc, **depth}
            z0 = self.z_init.expand(len(prompts), *self.z_init.shape[1:])
            images = _decoded(self.model, self.renoise_and_denoise(z0, c, uc, seeds, progress))
        return Samples(images, [inf.sample_metadata(prompt=p, seed=s, **self.common) for p, s in zip(prompts, seeds)])


# ----------------------------------------------------------------------------------------- image variations
@dataclass
class ImageVariations(SampledTask):
    """SD 2.1 unCLIP image variations (scripts/unclip.py): the input image's CLIP embedding, noise-augmented to
    `noise_level` with per-sample seeded noise and joined with the level's embedding, is the UNet's vector; the
    prompt (may be empty) the cross-attention context. Guidance: the unconditional side has the negative prompt (or
    the empty caption) and a zero vector, as SD 2's stable unCLIP script."""

    image: Image.Image | None = None
    image_path: str = "image.png"
    noise_level: int = 0
    scale: float = 10.0
    height: int | None = None
    width: int | None = None

    @staticmethod
    def supports(model: Any) -> bool:
        """ImageEmbeddingConditionedLatentDiffusion models (an image embedder feeding the vector)."""
        return callable(getattr(model, "image_embedding", None)) and inf.is_text_model(model)

    def __post_init__(self) -> None:
        model = self.model
        if not self.supports(model):
            raise inf.ScriptError(f"the model of '{self.ckpt}' is not an image-variation model "
                                  "(ImageEmbeddingConditionedLatentDiffusion with a text cond stage)")
        if self.image is None:
            raise inf.ScriptError("--init-img: no image given")
        augmentor = getattr(model, "noise_augmentor", None)
        max_level = getattr(augmentor, "max_noise_level", None)
        if augmentor is None and self.noise_level:
            raise inf.ScriptError(f"--noise_level {self.noise_level}: the model has no noise augmentation; use 0")
        if max_level is not None and not 0 <= self.noise_level < max_level:
            raise inf.ScriptError(f"--noise_level must lie in [0, {max_level}), got {self.noise_level}")
        native = int(model.image_size) * inf.first_stage_factor(model)
        self.height, self.width = self.height or native, self.width or native
        inf.check_size(self.height, self.width, inf.image_multiple(model))
        self.prepare_sampler()
        factor = inf.first_stage_factor(model)
        self.shape = (model.channels, self.height // factor, self.width // factor)
        with self.context():
            self.pixels = inf.image_to_tensor(self.image, model.device)
        self.common = inf.sample_metadata(
            **self.sampler_metadata(), noise_level=self.noise_level, init_image=os.path.basename(self.image_path),
            checkpoint=self.label, H=self.height, W=self.width)

    def embedding(self, seeds: Sequence[int]) -> torch.Tensor:
        """The UNet's vector for each sample: the image embedding noise-augmented with seeds[i]'s noise."""
        images = self.pixels.expand(len(seeds), *self.pixels.shape[1:])
        noise = None
        if getattr(self.model, "noise_augmentor", None) is not None:
            dim = self.model.embedder(self.pixels).shape[-1]
            noise = SeededNoise(seeds, self.model.device).randn((len(seeds), dim))
        return self.model.image_embedding(images, noise_level=self.noise_level, noise=noise)

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int], progress: Progress | None = None) -> Samples:
        """One variation of the image per prompt, prompt i with seeds[i]."""
        with self.context():
            text, text_uc = self.conditioning(prompts)
            vector = self.embedding(seeds)
            c = {**text, "vector": vector}
            uc = None if text_uc is None else {**text_uc, "vector": torch.zeros_like(vector)}
            images = _decoded(self.model, self.sample(c, uc, self.shape, seeds, progress))
        return Samples(images, [inf.sample_metadata(prompt=p, seed=s, **self.common) for p, s in zip(prompts, seeds)])
