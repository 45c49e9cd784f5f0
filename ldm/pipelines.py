"""The image tasks, shared by the sampling scripts (`scripts/txt2img.py`, `img2img.py`, `inpaint.py`, `superres.py`,
`sample_conditional.py`, `depth2img.py`, `unclip.py`) and the web UI (`ldm.webui`): one implementation of each task's
sampling, seeding and PNG metadata.

A task is made from a loaded model, its checkpoint path and the settings; making it checks the settings (one
`ldm.inference.ScriptError` naming the script flag of the culprit) so nothing is sampled before every input is known
to be good. Calling it samples one batch with per-sample seeds (sample i depends on seeds[i] only) and returns the
images with the metadata the scripts write into each PNG. `progress(done, total)` is called after every sampler step;
an exception it raises (the web UI's cancel) stops the sampling.

    job = Txt2Img(model, ckpt, sampler="ddim", steps=50, scale=7.5, height=512, width=512)
    samples = job(["a red circle on a white background"] * 2, seeds=[42, 43])
    samples.images  # (2, 3, 512, 512) in [-1, 1]; samples.metadata[1]["seed"] == 43

`Txt2Img.supports(model)` (and the others') tells which tasks a model can do; the web UI shows a tab for each.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm import inference as inf
from ldm.sampling.noise import SeededNoise

Progress = Callable[[int, int], None]


@dataclass
class Samples:
    """One batch of results: images (B, 3, H, W) in [-1, 1] (float32, CPU) and one metadata dict per image."""

    images: torch.Tensor
    metadata: list[dict[str, Any]]


def step_callback(progress: Progress | None, total: int) -> Callable[[int], None] | None:
    """The samplers' callback(i) as progress(steps done, total) (None without progress)."""
    if progress is None:
        return None
    return lambda i: progress(min(i + 1, total), total)


def unet_in_channels(model: Any) -> int:
    """The channels the UNet reads: the latent's, plus any concatenated conditioning."""
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    return int(getattr(unet, "in_channels", model.channels))


def is_plain(model: Any) -> bool:
    """Whether the UNet reads the latent alone (no concatenated mask, masked image or low-resolution image)."""
    return unet_in_channels(model) == model.channels


def _decoded(model: Any, z: torch.Tensor) -> torch.Tensor:
    """Latents decoded to images in [-1, 1], float32 on the CPU."""
    return model.decode_first_stage(z).detach().float().clamp(-1, 1).cpu()


@dataclass
class Task:
    """What every task holds: the model, its checkpoint (named in messages, labelled in metadata), DDIM-style
    settings and the precision (ldm.inference.autocast)."""

    model: Any
    ckpt: str
    steps: int = 50
    scale: float = 7.5
    eta: float = 0.0
    negative_prompt: str = ""
    precision: str = "autocast"

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """No gradients, and the autocast of `precision` on the model's device."""
        with torch.no_grad(), inf.autocast(self.precision, self.model.device):
            yield

    @property
    def label(self) -> str:
        """The checkpoint as PNG metadata names it."""
        return inf.checkpoint_label(self.ckpt)

    def conditioning(self, prompts: Sequence[str]) -> tuple[Any, Any]:
        """(c, uc) for a text model ((None, None) for an unconditional one), uc from the negative prompt."""
        return inf.prompt_conditioning(self.model, prompts, self.scale, self.negative_prompt)


# ----------------------------------------------------------------------------------------- txt2img
@dataclass
class Txt2Img(Task):
    """Text-to-image: latents drawn from per-sample seeded noise by a registered sampler under classifier-free
    guidance, then decoded (scripts/txt2img.py)."""

    sampler: str = "ddim"
    height: int = 512
    width: int = 512

    @staticmethod
    def supports(model: Any) -> bool:
        """Text-conditioned models whose UNet reads the latent alone."""
        return inf.is_text_model(model) and is_plain(model)

    def __post_init__(self) -> None:
        model = self.model
        if not inf.is_text_model(model):
            raise inf.ScriptError(f"the model of '{self.ckpt}' is not conditioned on text (cond_stage_key "
                                  f"{getattr(model, 'cond_stage_key', None)!r}); use scripts/sample_diffusion.py")
        if not is_plain(model):
            raise inf.ScriptError(f"the model of '{self.ckpt}' reads {unet_in_channels(model) - model.channels} "
                                  "concatenated conditioning channels (an inpainting or upscaling model); use "
                                  "scripts/inpaint.py or scripts/superres.py")
        factor = inf.first_stage_factor(model)
        inf.check_size(self.height, self.width, inf.image_multiple(model))
        inf.check_steps(self.sampler, self.steps, self.eta, model)
        self.shape = (model.channels, self.height // factor, self.width // factor)
        self._sampler = inf.make_sampler(self.sampler, model)
        self.common = inf.sample_metadata(
            sampler=self.sampler, steps=self.steps, scale=self.scale, negative_prompt=self.negative_prompt or None,
            eta=self.eta if self.sampler == "ddim" else None, checkpoint=self.label, H=self.height, W=self.width)

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int], progress: Progress | None = None) -> Samples:
        """One image per prompt, prompt i drawn with seeds[i]."""
        with self.context():
            c, uc = self.conditioning(prompts)
            z = inf.sample_latents(self._sampler, self.steps, c, uc, self.scale, self.eta, self.shape, seeds,
                                   callback=step_callback(progress, self.steps))
            images = _decoded(self.model, z)
        return Samples(images, [inf.sample_metadata(prompt=p, seed=s, **self.common) for p, s in zip(prompts, seeds)])


# ----------------------------------------------------------------------------------------- img2img
def fit_to_multiple(image: Image.Image, multiple: int, flag: str, name: str) -> Image.Image:
    """The image cropped (top left kept) to sides that are multiples of `multiple`; too small is a user error."""
    width, height = (side - side % multiple for side in image.size)
    if width == 0 or height == 0:
        raise inf.ScriptError(f"{flag}: '{name}' is {image.size[0]}x{image.size[1]}; both sides must be at least "
                              f"{multiple} pixels (the model's downsampling factor)")
    return image if (width, height) == image.size else image.crop((0, 0, width, height))


@dataclass
class Img2Img(Task):
    """Image-to-image (SDEdit, Meng et al. 2022): the image's latent noised to DDIM step strength * steps with
    per-sample seeded noise, then denoised over those steps (scripts/img2img.py).

    `image` is cropped to the model's downsampling factor (`size`; `cropped_from` is the size it had, or None);
    `image_path` is named in messages, its file name in the metadata.
    """

    image: Image.Image | None = None
    image_path: str = "image.png"
    strength: float = 0.75

    @staticmethod
    def supports(model: Any) -> bool:
        """Text-conditioned or unconditional models whose UNet reads the latent alone."""
        return is_plain(model) and (inf.is_text_model(model) or not inf.is_conditional(model))

    def __post_init__(self) -> None:
        from ldm.models.diffusion.ddim import DDIMSampler

        if not 0.0 <= self.strength <= 1.0:
            raise inf.ScriptError(f"--strength must lie in [0, 1], got {self.strength}")
        if self.image is None:
            raise inf.ScriptError("--init-img: no image given")
        init = fit_to_multiple(self.image, inf.image_multiple(self.model), "--init-img", self.image_path)
        self.size, self.cropped_from = init.size, None if init.size == self.image.size else self.image.size
        inf.check_steps("ddim", self.steps, self.eta, self.model)
        self._sampler = DDIMSampler(self.model)
        self._sampler.make_schedule(ddim_num_steps=self.steps, ddim_eta=self.eta, verbose=False)
        self.t_enc = int(self.strength * self.steps)
        self.common = inf.sample_metadata(
            sampler="ddim", steps=self.steps, scale=self.scale, negative_prompt=self.negative_prompt or None,
            eta=self.eta, strength=self.strength, t_enc=self.t_enc, init_image=os.path.basename(self.image_path),
            checkpoint=self.label)
        with self.context():
            self.z_init = inf.encode_image(self.model, inf.image_to_tensor(init, self.model.device))

    def renoise_and_denoise(self, z0: torch.Tensor, c: Any, uc: Any, seeds: Sequence[int],
                            progress: Progress | None = None) -> torch.Tensor:
        """Noise z0 to DDIM step t_enc - 1 with per-sample seeded noise, then run the first t_enc steps back."""
        if self.t_enc == 0:
            return z0
        noise = SeededNoise(seeds, z0.device).randn(z0.shape)
        t = torch.full((z0.shape[0],), self.t_enc - 1, dtype=torch.long, device=z0.device)
        z_enc = self._sampler.stochastic_encode(z0, t, noise=noise)
        return self._sampler.decode(z_enc, c, self.t_enc, unconditional_guidance_scale=self.scale,
                                    unconditional_conditioning=uc, callback=step_callback(progress, self.t_enc))

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int], progress: Progress | None = None) -> Samples:
        """One edit of the image per prompt, prompt i with seeds[i]."""
        with self.context():
            c, uc = self.conditioning(prompts)
            z0 = self.z_init.expand(len(prompts), *self.z_init.shape[1:])
            images = _decoded(self.model, self.renoise_and_denoise(z0, c, uc, seeds, progress))
        return Samples(images, [inf.sample_metadata(prompt=p, seed=s, **self.common) for p, s in zip(prompts, seeds)])


# ----------------------------------------------------------------------------------------- inpainting
@dataclass
class InpaintInput:
    """One image with its mask (1 = fill in), both (1, C, H, W) on the model's device, and where they came from."""

    image_path: str
    mask_path: str
    image: torch.Tensor
    mask: torch.Tensor


def inpaint_input(image: Image.Image, mask: Image.Image, image_path: str, mask_path: str, multiple: int,
                  device: torch.device) -> InpaintInput:
    """An image and its mask (white = fill in) checked: the same size, sides multiples of `multiple`."""
    if image.size != mask.size:
        raise inf.ScriptError(f"--mask: '{mask_path}' is {mask.size[0]}x{mask.size[1]} but its image "
                              f"'{image_path}' is {image.size[0]}x{image.size[1]}; they must be the same size")
    if image.size[0] % multiple or image.size[1] % multiple:
        raise inf.ScriptError(f"--image: '{image_path}' is {image.size[0]}x{image.size[1]}; both sides must be "
                              f"multiples of {multiple}, the model's downsampling factor")
    return InpaintInput(image_path, mask_path, inf.image_to_tensor(image, device), inf.mask_to_tensor(mask, device))


def inpaint_kind(model: Any) -> str:
    """'inpainting' (mask and masked image concatenated, SD 2), 'ldm-inpainting' (latent-diffusion's concat
    model on the first stage) or 'sampler-mask' (any other model)."""
    if hasattr(model, "concat_conditioning") and getattr(model, "masked_image_key", None):
        return "inpainting"
    if model.model.conditioning_key == "concat" and model.cond_stage_model is model.first_stage_model:
        return "ldm-inpainting"
    return "sampler-mask"


@dataclass
class Inpaint(Task):
    """Inpainting with DDIM (scripts/inpaint.py): the white region of the mask is painted, the rest of the result is
    the input's pixels. SD 2 inpainting models see the mask and the masked image's latent, latent-diffusion's
    inpainting model the masked image through the first stage, any other model keeps the known latent in the
    sampler (mask/x0)."""

    scale: float = 1.0
    prompt: str = ""

    @staticmethod
    def supports(model: Any) -> bool:
        """Inpainting models, and text-conditioned or unconditional models whose UNet reads the latent alone."""
        return inpaint_kind(model) != "sampler-mask" or Img2Img.supports(model)

    def __post_init__(self) -> None:
        from ldm.models.diffusion.ddim import DDIMSampler

        inf.check_steps("ddim", self.steps, self.eta, self.model)
        self.kind = inpaint_kind(self.model)
        self._sampler = DDIMSampler(self.model)

    def latent(self, job: InpaintInput, seed: int, progress: Progress | None = None) -> torch.Tensor:
        """The sampled latent for one image."""
        model = self.model
        masked = job.image * (1 - job.mask)
        factor = inf.first_stage_factor(model)
        size = (job.image.shape[2] // factor, job.image.shape[3] // factor)
        sample = dict(sampler=self._sampler, steps=self.steps, scale=self.scale, eta=self.eta,
                      shape=(model.channels, *size), seeds=[seed], callback=step_callback(progress, self.steps))
        if self.kind == "ldm-inpainting":  # latent-diffusion's inpaint.py: masked image through the first stage, mask
            c = model.get_learned_conditioning(masked)
            c = {"concat": torch.cat([c, F.interpolate(job.mask, size=c.shape[-2:])], dim=1)}
            return inf.sample_latents(c=c, uc=None, **{**sample, "scale": 1.0})
        c, uc = self.conditioning([self.prompt])
        if self.kind == "inpainting":  # the model's own concat inputs: the mask and the masked image
            batch = {"mask": job.mask.permute(0, 2, 3, 1), model.masked_image_key: masked.permute(0, 2, 3, 1)}
            concat = model.task_roles(batch, size)
            return inf.sample_latents(c={**c, **concat}, uc=None if uc is None else {**uc, **concat}, **sample)
        known = 1.0 - inf.downsample_mask(job.mask, factor)  # the samplers keep x0 where mask == 1
        x0 = inf.encode_image(model, job.image)
        return inf.sample_latents(c=c, uc=uc, mask=known, x0=x0, **sample)

    def __call__(self, job: InpaintInput, seed: int, progress: Progress | None = None) -> Samples:
        """The image with its masked region painted (seeded by `seed`); unmasked pixels are the input's."""
        with self.context():
            predicted = _decoded(self.model, self.latent(job, seed, progress))
        mask, image = job.mask.float().cpu(), job.image.float().cpu()
        result = (1 - mask) * image + mask * predicted
        meta = inf.sample_metadata(prompt=self.prompt, seed=seed, sampler="ddim", steps=self.steps, scale=self.scale,
                                   negative_prompt=self.negative_prompt or None, eta=self.eta, mode=self.kind,
                                   image=os.path.basename(job.image_path), mask=os.path.basename(job.mask_path),
                                   checkpoint=self.label)
        return Samples(result, [meta])


# ----------------------------------------------------------------------------------------- super-resolution
def superres_kind(model: Any) -> str | None:
    """'upscaler' (LatentUpscaleDiffusion), 'concat' (latent-diffusion SR: an image concatenated to the latent)
    or None (not a super-resolution model)."""
    if hasattr(model, "low_scale_model"):
        return "upscaler"
    if (getattr(model.model, "conditioning_key", None) == "concat" and model.cond_stage_model is not None
            and inpaint_kind(model) == "sampler-mask"):
        return "concat"
    return None


@dataclass
class Prepared:
    """One low-resolution image made into conditioning: (c, uc, guidance scale, latent size) and its seed."""

    path: str
    seed: int
    c: Any
    uc: Any
    scale: float
    size: tuple[int, int]


@dataclass
class SuperRes(Task):
    """Super-resolution with DDIM (scripts/superres.py): the SD x4 upscaler (noise-augmented low-resolution image
    concatenated, its level as the UNet's class label, guided by the prompt) or latent-diffusion's concat SR."""

    scale: float = 9.0
    prompt: str = ""
    noise_level: int = 20

    @staticmethod
    def supports(model: Any) -> bool:
        """Upscalers and image-concat SR models."""
        return superres_kind(model) is not None

    def __post_init__(self) -> None:
        kind = superres_kind(self.model)
        if kind is None:
            raise inf.ScriptError(f"the model of '{self.ckpt}' is not a super-resolution model: expected "
                                  "LatentUpscaleDiffusion or a LatentDiffusion with conditioning_key concat on an image")
        self.kind = kind
        inf.check_steps("ddim", self.steps, self.eta, self.model)
        self._sampler = inf.make_sampler("ddim", self.model)

    def _conditioning(self, low: torch.Tensor, seed: int) -> tuple[Any, Any, float, tuple[int, int]]:
        """(c, uc, guidance scale, latent size) for one low-resolution image in [-1, 1]."""
        model = self.model
        if self.kind == "concat":
            c = model.get_learned_conditioning(low)
            expected = getattr(model.model.diffusion_model, "in_channels", model.channels + c.shape[1])
            if model.channels + c.shape[1] != expected:
                raise inf.ScriptError(f"the model's UNet takes {expected} input channels, not {model.channels} latent "
                                      f"+ {c.shape[1]} conditioning channels: it is not an image-concat SR model")
            return {"concat": c}, None, 1.0, tuple(c.shape[-2:])
        max_level = getattr(model.low_scale_model, "max_noise_level", None)
        if not 0 <= self.noise_level < (max_level or model.low_scale_model.num_timesteps):
            raise inf.ScriptError(f"--noise_level must lie in [0, {max_level}), got {self.noise_level}")
        level = torch.full((low.shape[0],), self.noise_level, dtype=torch.long, device=low.device)
        noise = SeededNoise([seed], low.device).randn(low.shape)
        augmented, level = model.low_scale_model(low, noise_level=level, noise=noise)
        text, text_uc = self.conditioning([self.prompt])
        low_res = {"concat": augmented, "vector": level}
        c, uc = {**text, **low_res}, None if text_uc is None else {**text_uc, **low_res}
        return c, uc, self.scale, tuple(augmented.shape[-2:])

    def prepare(self, low: Image.Image, path: str, seed: int) -> Prepared:
        """One low-resolution image as conditioning, its latent size checked against the UNet's downsampling."""
        with self.context():
            c, uc, scale, size = self._conditioning(inf.image_to_tensor(low, self.model.device), seed)
        unet_multiple = inf.image_multiple(self.model) // inf.first_stage_factor(self.model)
        if size[0] % unet_multiple or size[1] % unet_multiple:
            raise inf.ScriptError(f"--image: '{path}' gives a {size[0]}x{size[1]} latent; its sides must be "
                                  f"multiples of {unet_multiple} (the UNet's downsampling)")
        return Prepared(path, seed, c, uc, scale, size)

    def __call__(self, prepared: Prepared, progress: Progress | None = None) -> Samples:
        """The upscaled image of one prepared input."""
        upscaler = self.kind == "upscaler"
        with self.context():
            z = inf.sample_latents(self._sampler, self.steps, prepared.c, prepared.uc, prepared.scale, self.eta,
                                   (self.model.channels, *prepared.size), [prepared.seed],
                                   callback=step_callback(progress, self.steps))
            image = _decoded(self.model, z)
        meta = inf.sample_metadata(prompt=self.prompt if upscaler else None, seed=prepared.seed, sampler="ddim",
                                   steps=self.steps, scale=prepared.scale,
                                   negative_prompt=(self.negative_prompt or None) if upscaler else None, eta=self.eta,
                                   mode=self.kind, noise_level=self.noise_level if upscaler else None,
                                   image=os.path.basename(prepared.path), checkpoint=self.label)
        return Samples(image, [meta])



# ----------------------------------------------------------------------------------------- layout / semantic maps
MAP_KEYS = {"coordinates_bbox": "layout", "segmentation": "semantic"}


def map_kind(model: Any) -> str | None:
    """'layout' (a cond stage reading `coordinates_bbox` token sequences by cross-attention), 'semantic' (a
    `segmentation` label map, concatenated after the cond stage) or None."""
    if not inf.is_conditional(model):
        return None
    return MAP_KEYS.get(getattr(model, "cond_stage_key", None))


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
class MapToImage(Task):
    """Layout-to-image and semantic synthesis (scripts/sample_conditional.py): latents sampled from per-sample seeded
    noise, conditioned on a bounding-box layout (token sequences, cross-attention; `height` x `width` pixels, any
    multiple of the model's factor, also beyond the training size) or on a label map (one-hot, concatenated at
    the latent size its cond stage gives). No guidance by default (the originals trained no null layout or map)."""

    scale: float = 1.0
    sampler: str = "ddim"
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
        inf.check_steps(self.sampler, self.steps, self.eta, self.model)
        self._sampler = inf.make_sampler(self.sampler, self.model)
        self.common = inf.sample_metadata(sampler=self.sampler, steps=self.steps, scale=self.scale,
                                          eta=self.eta if self.sampler == "ddim" else None, checkpoint=self.label)

    @property
    def key(self) -> str:
        """The batch key the model's cond stage reads."""
        return self.model.cond_stage_key

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
            z = inf.sample_latents(self._sampler, self.steps, c, None, 1.0, self.eta, (self.model.channels, *size),
                                   seeds, callback=step_callback(progress, self.steps))
            images = _decoded(self.model, z)
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
class ImageVariations(Task):
    """SD 2.1 unCLIP image variations (scripts/unclip.py): the input image's CLIP embedding, noise-augmented to
    `noise_level` with per-sample seeded noise and joined with the level's embedding, is the UNet's vector; the
    prompt (may be empty) the cross-attention context. Guidance: the unconditional side has the negative prompt (or
    the empty caption) and a zero vector, as SD 2's stable unCLIP script."""

    image: Image.Image | None = None
    image_path: str = "image.png"
    noise_level: int = 0
    scale: float = 10.0
    sampler: str = "ddim"
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
        inf.check_steps(self.sampler, self.steps, self.eta, model)
        factor = inf.first_stage_factor(model)
        self.shape = (model.channels, self.height // factor, self.width // factor)
        self._sampler = inf.make_sampler(self.sampler, model)
        with self.context():
            self.pixels = inf.image_to_tensor(self.image, model.device)
        self.common = inf.sample_metadata(
            sampler=self.sampler, steps=self.steps, scale=self.scale, negative_prompt=self.negative_prompt or None,
            eta=self.eta if self.sampler == "ddim" else None, noise_level=self.noise_level,
            init_image=os.path.basename(self.image_path), checkpoint=self.label, H=self.height, W=self.width)

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
            z = inf.sample_latents(self._sampler, self.steps, c, uc, self.scale, self.eta, self.shape, seeds,
                                   callback=step_callback(progress, self.steps))
            images = _decoded(self.model, z)
        return Samples(images, [inf.sample_metadata(prompt=p, seed=s, **self.common) for p, s in zip(prompts, seeds)])
