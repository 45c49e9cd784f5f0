"""`log_images` of LatentDiffusion: inputs, reconstructions, conditioning, sample grids (original keys)."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from ldm.models.diffusion.image_logging import log_txt_as_img, rows_to_grid
from ldm.modules.cached import FirstStageLatent
from ldm.modules.encoders.roles import take


def _is_image(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] in (1, 3)


def _is_map(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] > 3


class LatentImageLogging:
    """Mixin for LatentDiffusion: the original `log_images` and its row helpers."""

    def _get_denoise_row_from_list(self, samples: Any, desc: str = "", force_no_decoder_quantization: bool = False):
        """Decode a list of latents (or a DDIM intermediates dict) into a grid, one row per sample."""
        if isinstance(samples, dict):
            samples = samples["pred_x0"]
        decoded = [self.decode_first_stage(z.to(self.device), force_not_quantize=force_no_decoder_quantization)
                   for z in samples]
        return rows_to_grid(decoded)

    @torch.no_grad()
    def progressive_denoising(self, cond: Any, shape: tuple[int, ...], batch_size: int | None = None, **kwargs: Any):
        """Ancestral sampling that also returns the x0 prediction every log_every_t steps."""
        full_shape = (batch_size, *shape) if batch_size is not None else tuple(shape)
        x0_row: list[torch.Tensor] = []

        def keep(t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
            if t % self.log_every_t == 0 or t == self.num_timesteps - 1:
                x0_row.append(x0)

        img = self.p_sample_loop(full_shape, cond=cond, step_callback=keep, **kwargs)
        return img, x0_row

    def _conditioning_images(self, batch: dict, c: Any, xc: Any, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        log: dict[str, torch.Tensor] = {}
        if self.model.conditioning_key is None:
            return log
        if hasattr(self.cond_stage_model, "decode") and _is_image(c):
            log["conditioning"] = self.cond_stage_model.decode(c)
        elif self.cond_stage_key in ("caption", "txt") and isinstance(batch[self.cond_stage_key], (list, tuple)):
            log["conditioning"] = log_txt_as_img(size, batch[self.cond_stage_key], size=max(size[0] // 25, 8))
        elif self.cond_stage_key in ("class_label", "cls") and "human_label" in batch:
            log["conditioning"] = log_txt_as_img(size, batch["human_label"], size=max(size[0] // 25, 8))
        elif _is_image(xc):
            log["conditioning"] = xc
        if _is_map(xc):
            log["original_conditioning"] = self.to_rgb(xc)
        return log

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Project a many-channel map to RGB with a fixed random projection, scaled to [-1, 1]."""
        if not hasattr(self, "colorize"):
            gen = torch.Generator().manual_seed(0)
            self.register_buffer("colorize", torch.randn(3, x.shape[1], 1, 1, generator=gen).to(x), persistent=False)
        x = torch.nn.functional.conv2d(x, weight=self.colorize)
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0

    @staticmethod
    def sample_log_options(batch_size: int, ddim_steps: int | None, ddim_eta: float,
                           sampler: str | None = None) -> dict[str, Any]:
        """`sample_log`'s keywords for the log_images of this class and of the task models: `sampler` (a name of
        ldm.sampling.SAMPLERS) in ddim_steps steps, else DDIM when ddim_steps is set, else ancestral; ddim_eta is
        DDIM's eta (the other registered samplers keep their own)."""
        if sampler is not None and ddim_steps is None:
            raise ValueError(f"log_images(sampler='{sampler}') needs ddim_steps, the number of sampling steps")
        return dict(batch_size=batch_size, ddim=ddim_steps is not None, ddim_steps=ddim_steps, sampler=sampler,
                    eta=ddim_eta if sampler in (None, "ddim") else None)

    @torch.no_grad()
    def log_images(self, batch: dict, N: int = 8, n_row: int = 4, sample: bool = True, ddim_steps: int | None = 50,
                   ddim_eta: float = 0.0, return_keys: list[str] | None = None, quantize_denoised: bool = True,
                   inpaint: bool = True, plot_denoise_rows: bool = False, plot_progressive_rows: bool = True,
                   plot_diffusion_rows: bool = True, unconditional_guidance_scale: float = 1.0,
                   unconditional_guidance_label: Any = None, use_ema_scope: bool = True, sampler: str | None = None,
                   **kwargs: Any) -> dict[str, torch.Tensor]:
        """Images for the logger under the original keys (see module docstring). Samples are drawn with `sampler`
        (a name of ldm.sampling.SAMPLERS) in ddim_steps steps when given, else with DDIM when ddim_steps is set (the
        original), else ancestrally; ddim_eta is DDIM's eta."""
        ema_scope = self.ema_scope if use_ema_scope else (lambda *a, **k: nullcontext())
        z, c, x, xrec, xc = self.get_input(batch, self.first_stage_key, return_first_stage_outputs=True,
                                           force_c_encode=True, return_original_cond=True, bs=N)
        N, n_row = min(x.shape[0], N), min(x.shape[0], n_row)
        inputs = xrec if isinstance(x, FirstStageLatent) else x  # a latent cache has no images to show
        log: dict[str, torch.Tensor] = {"inputs": inputs, "reconstruction": xrec}
        log.update(self._conditioning_images(batch, c, xc, (x.shape[2], x.shape[3])))
        if plot_diffusion_rows:
            log["diffusion_row"] = rows_to_grid([self.decode_first_stage(z_t) for z_t in self._diffusion_row(z[:n_row])])
        sample_kw = self.sample_log_options(N, ddim_steps, ddim_eta, sampler)
        if sample:
            with ema_scope("Sampling"):
                samples, z_denoise_row = self.sample_log(cond=c, **sample_kw)
            log["samples"] = self.decode_first_stage(samples)
            if plot_denoise_rows:
                log["denoise_row"] = self._get_denoise_row_from_list(z_denoise_row)
            if quantize_denoised and hasattr(self.first_stage_model, "quantize"):
                with ema_scope("Plotting Quantized Denoised"):
                    samples, _ = self.sample_log(cond=c, quantize_x0=True, **sample_kw)
                log["samples_x0_quantized"] = self.decode_first_stage(samples)
        if unconditional_guidance_scale > 1.0:
            uc = self.guidance_unconditional(c, N, unconditional_guidance_label, inputs=take(batch, N))
            with ema_scope("Sampling with classifier-free guidance"):
                samples_cfg, _ = self.sample_log(cond=c, unconditional_guidance_scale=unconditional_guidance_scale,
                                                 unconditional_conditioning=uc, **sample_kw)
            log[f"samples_cfg_scale_{unconditional_guidance_scale:.2f}"] = self.decode_first_stage(samples_cfg)
        if inpaint:
            h, w = z.shape[2], z.shape[3]
            mask = torch.ones(N, 1, h, w, device=self.device)
            mask[:, :, h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 0.0  # zeros are filled in
            for key, m in (("samples_inpainting", mask), ("samples_outpainting", 1.0 - mask)):
                with ema_scope("Plotting " + key):
                    samples, _ = self.sample_log(cond=c, x0=z[:N], mask=m, **sample_kw)
                log[key] = self.decode_first_stage(samples)
            log["mask"] = mask
        if plot_progressive_rows:
            with ema_scope("Plotting Progressives"):
                _, progressives = self.progressive_denoising(c, shape=(self.channels, self.image_size, self.image_size),
                                                             batch_size=N)
            log["progressive_row"] = self._get_denoise_row_from_list(progressives, desc="Progressive Generation")
        if return_keys:
            return {key: log[key] for key in return_keys if key in log}
        return log
