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
    """Whether the UNet reads the latent alone (no concatenated mask, masked image or low-resolution image) and no
    vector beyond what its cond stage gives (unCLIP's image embedding)."""
    return unet_in_channels(model) == model.channels and not callable(getattr(model, "image_embedding", None))


MAP_KEYS = {"coordinates_bbox": "layout", "segmentation": "semantic"}


def map_kind(model: Any) -> str | None:
    """'layout' (a cond stage reading `coordinates_bbox` token sequences by cross-attention), 'semantic' (a
    `segmentation` label map, concatenated after the cond stage) or None (see `MapToImage`)."""
    if not inf.is_conditional(model):
        return None
    return MAP_KEYS.get(getattr(model, "cond_stage_key", None))


def reads_captions(model: Any) -> bool:
    """Whether the model is conditioned on captions (`inf.is_text_model` also counts layout token sequences)."""
    return inf.is_text_model(model) and map_kind(model) is None


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


@dataclass
class SampledTask(Task):
    """A task that draws latents from per-sample seeded noise with a registered sampler (any name of
    `ldm.inference.SAMPLERS`, or the alias "dpm"), with the sampling flags of scripts/txt2img.py.

    `eta` None is the sampler's own (0 for ddim, the original --ddim_eta default; 1 for the ancestral samplers);
    `spacing` (--schedule) picks the noise-level spacing (default: the sampler's); `guidance_rescale` blends the
    guided output towards the conditional one's standard deviation (Lin et al. 2023, eq. 15-16; 0: off).
    """

    eta: float | None = None
    sampler: str = "ddim"
    spacing: str | None = None
    guidance_rescale: float = 0.0

    def prepare_sampler(self) -> None:
        """Resolve eta, check the steps and eta the sampler accepts (one ScriptError naming the flag) and build it."""
        self.eta = inf.resolve_eta(self.sampler, self.eta)
        options = {"spacing": self.spacing} if self.spacing else {}
        inf.check_steps(self.sampler, self.steps, self.eta, self.model, **options)
        self._sampler = inf.make_sampler(self.sampler, self.model, **options)

    def sampler_metadata(self) -> dict[str, Any]:
        """The sampling settings as PNG metadata entries (None entries are dropped by sample_metadata)."""
        return dict(sampler=self.sampler, schedule=self.spacing, steps=self.steps, scale=self.scale,
                    negative_prompt=self.negative_prompt or None, eta=self.eta,
                    guidance_rescale=self.guidance_rescale or None)

    def sample(self, c: Any, uc: Any, shape: Sequence[int], seeds: Sequence[int],
               progress: Progress | None = None) -> torch.Tensor:
        """Latents of `shape` (C, h, w) for conditioning (c, uc), sample i from seeds[i]."""
        return inf.sample_latents(self._sampler, self.steps, c, uc, self.scale, self.eta, shape, seeds,
                                  callback=step_callback(progress, self.steps),
                                  guidance_rescale=self.guidance_rescale)


# ----------------------------------------------------------------------------------------- txt2img
@dataclass
class Txt2Img(SampledTask):
    """Text-to-image: latents drawn from per-sample seeded noise by a registered sampler under classifier-free
    guidance, then decoded (scripts/txt2img.py; the sampler settings as `SampledTask`'s)."""

    height: int = 512
    width: int = 512

    @staticmethod
    def supports(model: Any) -> bool:
        """Text-conditioned models whose UNet reads the latent alone."""
        return reads_captions(model) and is_plain(model)

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
        self.prepare_sampler()
        self.shape = (model.channels, self.height // factor, self.width // factor)
        self.common = inf.sample_metadata(**self.sampler_metadata(), checkpoint=self.label, H=self.height,
                                          W=self.width)

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int], progress: Progress | None = None) -> Samples:
        """One image per prompt, prompt i drawn with seeds[i]."""
        with self.context():
            c, uc = self.conditioning(prompts)
            images = _decoded(self.model, self.sample(c, uc, self.shape, seeds, progress))
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
        return is_plain(model) and (reads_captions(model) or not inf.is_conditional(model))

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
            and inpaint_kind(model) == "sampler-mask" and map_kind(model) is None):  # not label maps
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




# The tasks conditioned on maps and images (layout-to-image, semantic synthesis, depth-to-image, image variations)
# live in ldm/pipelines_conditioned.py, served from here (resolved on first access, PEP 562: no import cycle).
_CONDITIONED = ("read_layout", "read_segmentation", "MapToImage", "depth_to_concat",
                "Depth2Img", "ImageVariations")


def __getattr__(name: str) -> Any:
    if name in _CONDITIONED:
        from ldm import pipelines_conditioned

        return getattr(pipelines_conditioned, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
