"""Stable unCLIP (SD 2.1 `v2-1-stable-unclip-{h,l}-inference.yaml`): a text-conditioned LDM that also reads a CLIP
image embedding, noise-augmented (Ramesh et al. 2022's decoder conditioning, with the Karlo schedule), as the
`vector` role (the UNet's `y`, `num_classes: sequential`); text goes to `crossattn` (conditioning_key crossattn-adm).

The embedding is a task embedder on `embedding_key`'s images, run through the conditioner's loop: in training it
is dropped to zeros with probability `embedding_dropout` (classifier-free guidance on the image), drawn as the
original (a Bernoulli draw on the model's device after the noise augmentation). Served as
`ldm.models.diffusion.ddpm.ImageEmbeddingConditionedLatentDiffusion`, the original path.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn

from ldm.models.diffusion.ddpm import images_bchw
from ldm.models.diffusion.image_logging import log_txt_as_img
from ldm.models.diffusion.latent_diffusion import LatentDiffusion
from ldm.models.diffusion.task_models import defer_restore, restore_deferred
from ldm.modules.encoders.conditioner import EmbedderSpec
from ldm.util import ConfigError, freeze_module, instantiate_from_config

logger = logging.getLogger(__name__)


class ImageEmbeddingConditionedLatentDiffusion(LatentDiffusion):
    """LatentDiffusion with a frozen image embedder (`embedder_config`) whose (noise-augmented, `noise_aug_config`)
    embedding of `embedding_key`'s images is the UNet's vector input; state_dict keys `embedder.*`,
    `noise_augmentor.*` as the original."""

    def __init__(self, embedder_config: Any, embedding_key: str = "jpg", embedding_dropout: float = 0.5,
                 freeze_embedder: bool = True, noise_aug_config: Any = None, *args: Any, **kwargs: Any):
        if not freeze_embedder:
            raise ConfigError("model.params.freeze_embedder: false is not supported (the original never set its "
                              "embedder then); the image embedder is frozen")
        if not 0.0 <= embedding_dropout <= 1.0:
            raise ConfigError(f"model.params.embedding_dropout must lie in [0, 1], got {embedding_dropout}")
        restore = defer_restore(kwargs)  # the checkpoint holds embedder.* / noise_augmentor.* too
        super().__init__(*args, **kwargs)
        self.embed_key = embedding_key
        self.embedding_dropout = embedding_dropout
        self.embedder = freeze_module(instantiate_from_config(embedder_config))
        self.noise_augmentor = self._noise_augmentor(noise_aug_config)
        restore_deferred(self, restore)

    @staticmethod
    def _noise_augmentor(config: Any) -> nn.Module | None:
        """The embedding's noise augmentation (the Karlo schedule in the published configs), frozen; or none."""
        if config is None:
            return None
        augmentor = instantiate_from_config(config)
        if not isinstance(augmentor, nn.Module):
            raise ConfigError(f"model.params.noise_aug_config builds a {type(augmentor).__name__}, not a torch module")
        return freeze_module(augmentor)

    @torch.no_grad()
    def image_embedding(self, images: torch.Tensor, noise_level: torch.Tensor | int | None = None,
                        noise: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's vector input for [-1, 1] images [B, 3, H, W]: the embedder's output, noise-augmented to
        `noise_level` (drawn at random when None, as in training) with `noise` (drawn when None) and joined with the
        level's embedding [B, D + timestep_dim] (with a noise_aug_config; else the embedding itself)."""
        c_adm = self.embedder(images.to(self.device))
        if self.noise_augmentor is None:
            return c_adm
        if noise_level is not None:
            noise_level = torch.as_tensor(noise_level, device=self.device).long().expand(c_adm.shape[0])
        c_adm, level_emb = self.noise_augmentor(c_adm, noise_level=noise_level, noise=noise)
        return torch.cat((c_adm, level_emb), 1)

    def task_embedders(self, latent_size: Sequence[int]) -> list[tuple[EmbedderSpec, Callable[..., Any]]]:
        """The image embedding of `embedding_key` as the vector, dropped at `embedding_dropout` in training."""
        spec = EmbedderSpec((self.embed_key,), role="vector", ucg_rate=float(self.embedding_dropout),
                            name=f"embedding_key '{self.embed_key}'")
        return [(spec, lambda images: self.image_embedding(images_bchw(images)))]

    def task_drop(self, n: int, rate: float) -> torch.Tensor:
        """The original's draw: a Bernoulli(1 - rate) keep mask on the model's device."""
        return torch.bernoulli((1.0 - rate) * torch.ones(n, device=self.device)) == 0

    @torch.no_grad()
    def get_input(self, batch: dict, k: str, cond_key: str | None = None, bs: int | None = None,
                  **kwargs: Any) -> list:
        """[z, {"c_crossattn": [text], "c_adm": image embedding}] (+ what LatentDiffusion.get_input adds)."""
        z, c, *rest = super().get_input(batch, k, cond_key=cond_key, bs=bs, **kwargs)
        return [z, self.with_task_roles(c, batch, z.shape[-2:], bs), *rest]

    @torch.no_grad()
    def log_images(self, batch: dict, N: int = 8, n_row: int = 4, **kwargs: Any) -> dict[str, torch.Tensor]:
        """inputs, reconstruction, the captions, and guided samples (`samplescfg_scale_<s>`, the original key; DDIM in
        ddim_steps steps, or `sampler`, a name of ldm.sampling.SAMPLERS); the unconditional input replaces the text
        by `unconditional_guidance_label` (default '') and keeps the image embedding."""
        if self.cond_stage_key not in ("caption", "txt"):
            raise ValueError(f"{type(self).__name__}.log_images: cond_stage_key must be 'caption' or 'txt', "
                             f"got '{self.cond_stage_key}'")
        z, c, x, xrec, _ = self.get_input(batch, self.first_stage_key, bs=N, return_first_stage_outputs=True,
                                          return_original_cond=True)
        N = min(x.shape[0], N)
        log: dict[str, torch.Tensor] = {"inputs": x, "reconstruction": xrec}
        log["conditioning"] = log_txt_as_img((x.shape[2], x.shape[3]), batch[self.cond_stage_key][:N],
                                             size=max(x.shape[2] // 25, 8))
        scale = kwargs.get("unconditional_guidance_scale", 5.0)
        uc = self.guidance_unconditional(c, N, kwargs.get("unconditional_guidance_label", ""))
        ema_scope = self.ema_scope if kwargs.get("use_ema_scope", True) else (lambda *a, **k: nullcontext())
        sample_kw = self.sample_log_options(N, kwargs.get("ddim_steps", 50), kwargs.get("ddim_eta", 0.0),
                                            kwargs.get("sampler"))
        with ema_scope("Sampling"):
            samples, _ = self.sample_log(cond=c, unconditional_guidance_scale=scale, unconditional_conditioning=uc,
                                         **sample_kw)
        log[f"samplescfg_scale_{scale:.2f}"] = self.decode_first_stage(samples)
        return log
