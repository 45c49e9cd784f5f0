"""Task models on top of LatentDiffusion (Stable Diffusion 2): inpainting, depth-to-image and latent upscaling.

`LatentFinetuneDiffusion` adds concatenated conditioning to a text-conditioned LDM and fine-tunes
it from a checkpoint whose first convolution has fewer input channels: the checkpoint's channels are
kept and the new ones start at zero (`finetune_keys` / `keep_finetune_dims`), so the widened model
behaves as the original one at initialisation. `LatentInpaintDiffusion` concatenates the
downsampled mask and the latent of the masked image (4 + 1 + 4 = 9 UNet input channels);
`LatentUpscaleDiffusion` concatenates a noise-augmented low-resolution image and passes its noise
level as the UNet's class label (`c_adm`, conditioning_key hybrid-adm). `LatentDepth2ImageDiffusion` concatenates
the normalised MiDaS depth of the input (5 channels); `LatentUpscaleFinetuneDiffusion` the low-resolution image at
the latent size (optionally reshuffled, optionally noise-augmented with its level as `c_adm`). Configs name them as
`ldm.models.diffusion.ddpm.<Class>`.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from ldm.models.diffusion.ddpm import _fit_state_dict, batch_images, images_bchw
from ldm.models.diffusion.image_logging import rows_to_grid
from ldm.models.diffusion.latent_diffusion import LatentDiffusion
from ldm.modules.encoders.conditioner import EmbedderSpec
from ldm.modules.encoders.roles import take
from ldm.util import freeze_module, instantiate_from_config

logger = logging.getLogger(__name__)

DEFAULT_FINETUNE_KEYS = ("model.diffusion_model.input_blocks.0.0.weight",
                         "model_ema.diffusion_modelinput_blocks00weight")
RESTORE_OPTIONS = ("ckpt_path", "ignore_keys", "reset_ema", "reset_num_ema_updates")


def defer_restore(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take the checkpoint options out of a model's kwargs, for a subclass whose own modules (an embedder, a depth
    stage) the checkpoint also fills: it builds them, then calls `restore_deferred`."""
    return {key: kwargs.pop(key) for key in RESTORE_OPTIONS if key in kwargs}


def restore_deferred(model: LatentDiffusion, options: dict[str, Any]) -> None:
    """Load the checkpoint named by the options `defer_restore` took, now that every module exists."""
    model.restarted_from_ckpt = options.get("ckpt_path") is not None
    model._restore_from_checkpoint(options.get("ckpt_path"), options.get("ignore_keys", ()), False,
                                   options.get("reset_ema", False), options.get("reset_num_ema_updates", False))


class TaskImageLogging:
    """The rows `log_images` of the task models share: diffusion row, samples, guided samples, progressives."""

    def _log_sampling_rows(self, log: dict[str, torch.Tensor], z: torch.Tensor, cond: dict[str, Any], N: int,
                           n_row: int, sample: bool, ddim_steps: int | None, ddim_eta: float,
                           plot_denoise_rows: bool, plot_progressive_rows: bool, plot_diffusion_rows: bool,
                           unconditional_guidance_scale: float, unconditional_guidance_label: Any,
                           ema_scope: Callable, sampler: str | None = None) -> None:
        """Add the forward-process row, samples (plain and guided, drawn with `sampler` as LatentDiffusion's
        log_images draws them) and denoising rows to `log`."""
        sample_kw = self.sample_log_options(N, ddim_steps, ddim_eta, sampler)
        if plot_diffusion_rows:
            log["diffusion_row"] = rows_to_grid([self.decode_first_stage(z_t) for z_t in self._diffusion_row(z[:n_row])])
        if sample:
            with ema_scope("Sampling"):
                samples, z_denoise_row = self.sample_log(cond=cond, **sample_kw)
            log["samples"] = self.decode_first_stage(samples)
            if plot_denoise_rows:
                log["denoise_row"] = self._get_denoise_row_from_list(z_denoise_row)
        if unconditional_guidance_scale > 1.0:
            uc = self.task_unconditional_conditioning(cond, N, unconditional_guidance_label)
            with ema_scope("Sampling with classifier-free guidance"):
                samples_cfg, _ = self.sample_log(cond=cond, unconditional_guidance_scale=unconditional_guidance_scale,
                                                 unconditional_conditioning=uc, **sample_kw)
            log[f"samples_cfg_scale_{unconditional_guidance_scale:.2f}"] = self.decode_first_stage(samples_cfg)
        if plot_progressive_rows:
            with ema_scope("Plotting Progressives"):
                _, progressives = self.progressive_denoising(cond, shape=(self.channels, self.image_size, self.image_size),
                                                             batch_size=N)
            log["progressive_row"] = self._get_denoise_row_from_list(progressives, desc="Progressive Generation")

    def task_unconditional_conditioning(self, cond: dict[str, Any], batch_size: int, null_label: Any = None) -> dict:
        """Guidance's unconditional input: the text conditioning replaced by the null caption, the rest kept."""
        return self.guidance_unconditional(cond, batch_size, null_label)


class LatentFinetuneDiffusion(TaskImageLogging, LatentDiffusion):
    """Base of the fine-tuned task models: concatenated conditioning from `concat_keys`, and widening of the
    `finetune_keys` tensors of a narrower `ckpt_path` checkpoint to this model's input channels (set
    finetune_keys to None to disable). Without ckpt_path the keys are unused (the original required one)."""

    def __init__(self, concat_keys: Sequence[str], finetune_keys: Sequence[str] | None = DEFAULT_FINETUNE_KEYS,
                 keep_finetune_dims: int = 4, c_concat_log_start: int | None = None,
                 c_concat_log_end: int | None = None, *args: Any, **kwargs: Any):
        # set before LatentDiffusion.__init__, which loads ckpt_path through adapt_checkpoint
        self.finetune_keys = tuple(finetune_keys) if finetune_keys is not None else None
        self.concat_keys = tuple(concat_keys)
        self.keep_dims = int(keep_finetune_dims)
        self.c_concat_log_start = c_concat_log_start
        self.c_concat_log_end = c_concat_log_end
        super().__init__(*args, **kwargs)
        if self.cond_stage_trainable:
            raise ValueError(f"{type(self).__name__}: cond_stage_trainable must be false (trainable conditioners "
                             "are not supported with concatenated conditioning)")

    def adapt_checkpoint(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Widen the `finetune_keys` tensors of a narrower checkpoint: its first `keep_finetune_dims` input
        channels are kept, the others start at zero. Tensors that already fit are left alone."""
        if not self.finetune_keys:
            return sd
        own = self.state_dict()
        sd = dict(sd)
        for key in self.finetune_keys:
            if key not in sd or key not in own or sd[key].shape == own[key].shape:
                continue
            old, new = sd[key], own[key]
            if (old.ndim != new.ndim or old.shape[0] != new.shape[0] or old.shape[2:] != new.shape[2:]
                    or not self.keep_dims <= min(old.shape[1], new.shape[1])):
                raise ValueError(f"finetune_keys: cannot widen '{key}' from {tuple(old.shape)} to {tuple(new.shape)} "
                                 f"keeping keep_finetune_dims={self.keep_dims} input channels")
            logger.info("modifying key '%s' and keeping its original %d (channels) dimensions only", key, self.keep_dims)
            sd[key] = _fit_state_dict({key: new}, {key: old[:, :self.keep_dims]})[key]
        return sd

    def task_embedders(self, latent_size: Sequence[int]) -> list[tuple[EmbedderSpec, Callable[..., Any]]]:
        """One concat embedder per `concat_keys` entry, in order: its image resized (nearest) to the latent size."""
        return [(EmbedderSpec((key,), role="concat", name=f"concat_keys '{key}'"),
                 partial(self.concat_part, key, tuple(latent_size))) for key in self.concat_keys]

    def concat_part(self, key: str, latent_size: tuple[int, ...], value: Any) -> torch.Tensor:
        """The concat channels of one `concat_keys` input: its images (BHWC) resized (nearest) to the latent size."""
        return F.interpolate(images_bchw(value).to(self.device), size=latent_size)

    @torch.no_grad()
    def concat_conditioning(self, batch: dict, latent_size: Sequence[int], bs: int | None = None) -> torch.Tensor:
        """The c_concat tensor: the `concat_keys` parts joined along the channels."""
        return self.task_roles(batch, latent_size, bs)["concat"]

    @torch.no_grad()
    def get_input(self, batch: dict, k: str, cond_key: str | None = None, bs: int | None = None,
                  return_first_stage_outputs: bool = False, **kwargs: Any) -> list:
        """[z, {"c_concat": [...], "c_crossattn": [...]}] (+ x, reconstruction, original conditioning)."""
        z, c, *rest = super().get_input(batch, k, return_first_stage_outputs=return_first_stage_outputs,
                                        force_c_encode=True, cond_key=cond_key, return_original_cond=True, bs=bs)
        cond = self.with_task_roles(c, batch, z.shape[-2:], bs)
        if return_first_stage_outputs:
            return [z, cond, *rest]
        return [z, cond]

    @torch.no_grad()
    def log_images(self, batch: dict, N: int = 8, n_row: int = 4, sample: bool = True, ddim_steps: int | None = 200,
                   ddim_eta: float = 1.0, return_keys: list[str] | None = None, quantize_denoised: bool = True,
                   inpaint: bool = True, plot_denoise_rows: bool = False, plot_progressive_rows: bool = True,
                   plot_diffusion_rows: bool = True, unconditional_guidance_scale: float = 1.0,
                   unconditional_guidance_label: Any = None, use_ema_scope: bool = True, sampler: str | None = None,
                   **kwargs: Any) -> dict[str, torch.Tensor]:
        """inputs, reconstruction, conditioning, decoded c_concat channels, rows, samples (guided too; drawn with
        `sampler`, a name of ldm.sampling.SAMPLERS, when given)."""
        ema_scope = self.ema_scope if use_ema_scope else (lambda *a, **k: nullcontext())
        z, cond, x, xrec, xc = self.get_input(batch, self.first_stage_key, bs=N, return_first_stage_outputs=True)
        N, n_row = min(x.shape[0], N), min(x.shape[0], n_row)
        log: dict[str, torch.Tensor] = {"inputs": x, "reconstruction": xrec}
        c = cond.get("c_crossattn", [None])[0]
        log.update(self._conditioning_images(batch, c, xc, (x.shape[2], x.shape[3])))
        if not (self.c_concat_log_start is None and self.c_concat_log_end is None):
            c_cat = cond["c_concat"][0]
            log["c_concat_decoded"] = self.decode_first_stage(c_cat[:, self.c_concat_log_start:self.c_concat_log_end])
        self._log_sampling_rows(log, z, cond, N, n_row, sample, ddim_steps, ddim_eta, plot_denoise_rows,
                                plot_progressive_rows, plot_diffusion_rows, unconditional_guidance_scale,
                                unconditional_guidance_label, ema_scope, sampler)
        if return_keys:
            return {key: log[key] for key in return_keys if key in log}
        return log


class LatentInpaintDiffusion(LatentFinetuneDiffusion):
    """Inpainting: the UNet also sees the mask (1 = fill in), downsampled to the latent size, and the latent of
    the masked image. Mixed conditioning (text by cross-attention) with conditioning_key hybrid, or concat only."""

    def __init__(self, concat_keys: Sequence[str] = ("mask", "masked_image"), masked_image_key: str = "masked_image",
                 *args: Any, **kwargs: Any):
        if masked_image_key not in concat_keys:
            raise ValueError(f"LatentInpaintDiffusion: masked_image_key '{masked_image_key}' must be one of "
                             f"concat_keys {list(concat_keys)}")
        super().__init__(concat_keys, *args, **kwargs)
        self.masked_image_key = masked_image_key

    def concat_part(self, key: str, latent_size: tuple[int, ...], value: Any) -> torch.Tensor:
        """The masked image encoded by the first stage; masks resized (nearest) to the latent size."""
        if key != self.masked_image_key:
            return super().concat_part(key, latent_size, value)
        return self.get_first_stage_encoding(self.encode_first_stage(images_bchw(value).to(self.device)))

    @torch.no_grad()
    def log_images(self, batch: dict, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The finetune logs plus the masked image the model was given."""
        log = super().log_images(batch, *args, **kwargs)
        log["masked_image"] = batch_images(batch, self.masked_image_key)
        return log


class LatentDepth2ImageDiffusion(LatentFinetuneDiffusion):
    """Depth-to-image (SD 2 `v2-midas-inference.yaml`): the depth stage (`depth_stage_config`, MiDaS) estimates the
    inverse depth of `concat_keys[0]` (the MiDaS input, BCHW, as `ldm.data.util.AddMiDaS` makes it), resized
    (bicubic) to the latent and normalised per sample to [-1, 1], as the concat channel (5 UNet input channels)."""

    def __init__(self, depth_stage_config: Any, concat_keys: Sequence[str] = ("midas_in",), *args: Any, **kwargs: Any):
        if len(concat_keys) != 1:
            raise ValueError(f"LatentDepth2ImageDiffusion: concat_keys must name one key (the depth model's input), "
                             f"got {list(concat_keys)}")
        restore = defer_restore(kwargs)  # the checkpoint holds depth_model.* too
        super().__init__(concat_keys, *args, **kwargs)
        self.depth_model = freeze_module(instantiate_from_config(depth_stage_config))
        self.depth_stage_key = concat_keys[0]
        restore_deferred(self, restore)

    def depth(self, midas_in: Any, size: Sequence[int] | None = None, eps: float = 0.0) -> torch.Tensor:
        """The depth stage's output for its input images [B, 3, H, W], resized (bicubic) to `size` when given, and
        normalised per sample to [-1, 1] (`eps` widens the range, as the conditioning does)."""
        depth = self.depth_model(torch.as_tensor(midas_in).to(self.device).float())
        if size is not None:
            depth = F.interpolate(depth, size=tuple(size), mode="bicubic", align_corners=False)
        lo, hi = depth.amin(dim=(1, 2, 3), keepdim=True), depth.amax(dim=(1, 2, 3), keepdim=True)
        return 2.0 * (depth - lo) / (hi - lo + eps).clamp_min(torch.finfo(depth.dtype).tiny) - 1.0  # flat: -1

    def concat_part(self, key: str, latent_size: tuple[int, ...], value: Any) -> torch.Tensor:
        """The depth of the MiDaS input at the latent size, in [-1, 1]."""
        return self.depth(value, latent_size, eps=0.001)

    @torch.no_grad()
    def log_images(self, batch: dict, N: int = 8, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The finetune logs plus the estimated depth of the first N inputs, in [-1, 1]."""
        log = super().log_images(batch, N, *args, **kwargs)
        log["depth"] = self.depth(take(batch[self.depth_stage_key], N))
        return log


class LatentUpscaleFinetuneDiffusion(LatentFinetuneDiffusion):
    """Upscaling by fine-tuning (SD 2's x4 upscaler variant named by its gradio/streamlit scripts, no published
    config): the low-resolution `concat_keys` images are concatenated at the latent size (optionally space-to-depth
    reshuffled by `reshuffle_patch_size`); with `low_scale_config`, the `low_scale_key` image is noise-augmented
    and its noise level becomes the vector (conditioning_key hybrid-adm)."""

    def __init__(self, concat_keys: Sequence[str] = ("lr",), reshuffle_patch_size: int | None = None,
                 low_scale_config: Any = None, low_scale_key: str | None = None, *args: Any, **kwargs: Any):
        if reshuffle_patch_size is not None and (not isinstance(reshuffle_patch_size, int) or reshuffle_patch_size < 1):
            raise ValueError(f"reshuffle_patch_size must be a positive int, got {reshuffle_patch_size!r}")
        if low_scale_config is not None and low_scale_key not in concat_keys:
            raise ValueError(f"low_scale_config needs low_scale_key, one of concat_keys {list(concat_keys)}; got "
                             f"{low_scale_key!r}")
        super().__init__(concat_keys, *args, **kwargs)
        self.reshuffle_patch_size = reshuffle_patch_size
        self.low_scale_key = low_scale_key
        self.low_scale_model = None
        if low_scale_config is not None:
            logger.info("Initializing a low-scale model")
            self.low_scale_model = freeze_module(instantiate_from_config(low_scale_config))

    def concat_part(self, key: str, latent_size: tuple[int, ...], value: Any) -> torch.Tensor | dict[str, Any]:
        """The images of `key` (BHWC) as channels at the latent size, reshuffled; the low-scale key's noise-augmented,
        with its noise level as the vector."""
        x = images_bchw(value).to(self.device)
        if self.reshuffle_patch_size is not None:
            x = space_to_depth(x, self.reshuffle_patch_size)
        if tuple(x.shape[-2:]) != tuple(latent_size):
            raise ValueError(f"concat_keys '{key}': {tuple(x.shape[-2:])} images (after reshuffle_patch_size="
                             f"{self.reshuffle_patch_size}) do not match the latent size {tuple(latent_size)}")
        if self.low_scale_model is not None and key == self.low_scale_key:
            x, noise_level = self.low_scale_model(x)
            return {"concat": x, "vector": noise_level}
        return x

    @torch.no_grad()
    def log_images(self, batch: dict, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The finetune logs plus the low-resolution input (`lr`)."""
        log = super().log_images(batch, *args, **kwargs)
        log["lr"] = batch_images(batch, self.concat_keys[0])
        return log


def space_to_depth(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, p*h, p*w] -> [B, p*p*C, h, w], the patch offsets outermost (einops 'b c (p1 h) (p2 w) -> b (p1 p2 c)
    h w')."""
    b, c, height, width = x.shape
    if height % p or width % p:
        raise ValueError(f"reshuffle_patch_size={p} does not divide the {height}x{width} images")
    x = x.reshape(b, c, p, height // p, p, width // p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, p * p * c, height // p, width // p)


class LatentUpscaleDiffusion(TaskImageLogging, LatentDiffusion):
    """Latent super-resolution: the low-resolution image (`low_scale_key`), prepared by the low-scale model
    (noise augmentation), is concatenated to the latent; its noise level is the UNet's class label."""

    def __init__(self, *args: Any, low_scale_config: Any, low_scale_key: str = "LR",
                 noise_level_key: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.cond_stage_trainable:
            raise ValueError("LatentUpscaleDiffusion: cond_stage_trainable must be false")
        self.instantiate_low_stage(low_scale_config)
        self.low_scale_key = low_scale_key
        self.noise_level_key = noise_level_key
        if noise_level_key is not None and "noise_level" not in inspect.signature(self.low_scale_model.forward).parameters:
            raise ValueError(f"noise_level_key '{noise_level_key}' needs a low_scale_config model that takes noise "
                             f"levels, {type(self.low_scale_model).__name__} does not")

    def instantiate_low_stage(self, config: Any) -> None:
        """Build the low-scale model, frozen and kept in eval mode."""
        self.low_scale_model = freeze_module(instantiate_from_config(config))

    @torch.no_grad()
    def get_input(self, batch: dict, k: str, cond_key: str | None = None, bs: int | None = None,
                  log_mode: bool = False, **kwargs: Any) -> list:
        """[z, {"c_concat": [low-res input], "c_crossattn": [c], "c_adm": noise levels}]; with log_mode also
        x, reconstruction, original conditioning, the low-res image, its decoded input and the noise levels."""
        z, c, *rest = super().get_input(batch, k, return_first_stage_outputs=log_mode, force_c_encode=True,
                                        cond_key=cond_key, return_original_cond=log_mode, bs=bs)
        cond = self.with_task_roles(c, batch, z.shape[-2:], bs)
        if log_mode:
            zx, noise_level = cond["c_concat"][0], cond["c_adm"]
            x_low = batch_images(batch, self.low_scale_key)[:bs].to(self.device)
            return [z, cond, *rest, x_low, self.low_scale_model.decode(zx), noise_level]
        return [z, cond]

    def task_embedders(self, latent_size: Sequence[int]) -> list[tuple[EmbedderSpec, Callable[..., Any]]]:
        """One embedder of the low-resolution image (and its noise levels with `noise_level_key`): the low-scale
        model's noise-augmented image as concat channels, its noise level as the vector."""
        keys = (self.low_scale_key,) + ((self.noise_level_key,) if self.noise_level_key is not None else ())
        return [(EmbedderSpec(keys, name=f"low_scale_key '{self.low_scale_key}'"), self.low_scale_roles)]

    def low_scale_roles(self, low: Any, levels: Any = None) -> dict[str, torch.Tensor]:
        """{"concat": noise-augmented low-res image, "vector": its noise levels} from the low-scale model."""
        x_low = images_bchw(low).to(self.device)
        if levels is None:
            zx, noise_level = self.low_scale_model(x_low)
        else:
            zx, noise_level = self.low_scale_model(x_low, noise_level=torch.as_tensor(levels).to(self.device).long())
        return {"concat": zx, "vector": noise_level}

    @torch.no_grad()
    def log_images(self, batch: dict, N: int = 8, n_row: int = 4, sample: bool = True, ddim_steps: int | None = 200,
                   ddim_eta: float = 1.0, return_keys: list[str] | None = None, plot_denoise_rows: bool = False,
                   plot_progressive_rows: bool = True, plot_diffusion_rows: bool = True,
                   unconditional_guidance_scale: float = 1.0, unconditional_guidance_label: Any = None,
                   use_ema_scope: bool = True, sampler: str | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        """inputs, reconstruction, the low-res input (x_lr) and what the UNet sees of it, conditioning, samples
        (drawn with `sampler`, a name of ldm.sampling.SAMPLERS, when given)."""
        ema_scope = self.ema_scope if use_ema_scope else (lambda *a, **k: nullcontext())
        z, cond, x, xrec, xc, x_low, x_low_rec, noise_level = self.get_input(batch, self.first_stage_key, bs=N,
                                                                             log_mode=True)
        N, n_row = min(x.shape[0], N), min(x.shape[0], n_row)
        log: dict[str, torch.Tensor] = {"inputs": x, "reconstruction": xrec, "x_lr": x_low}
        levels = "-" if noise_level is None else "-".join(str(int(v)) for v in noise_level.cpu())
        log[f"x_lr_rec_@noise_levels{levels}"] = x_low_rec
        log.update(self._conditioning_images(batch, cond["c_crossattn"][0], xc, (x.shape[2], x.shape[3])))
        self._log_sampling_rows(log, z, cond, N, n_row, sample, ddim_steps, ddim_eta, plot_denoise_rows,
                                plot_progressive_rows, plot_diffusion_rows, unconditional_guidance_scale,
                                unconditional_guidance_label, ema_scope, sampler)
        if return_keys:
            return {key: log[key] for key in return_keys if key in log}
        return log
