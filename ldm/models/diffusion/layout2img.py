"""Layout-to-image (latent-diffusion's `Layout2ImgDiffusion`): a LatentDiffusion whose cond stage reads the
`coordinates_bbox` token sequence of an image's bounding boxes (a BERTEmbedder-style transformer over the tokens,
`use_tokenizer: false`) by cross-attention; its `log_images` also draws each layout (`bbox_image`).

The drawing reads the tokens with a `BoundingBoxLayout`: `bbox_tokenizer_config` (which also names the classes), or,
as the original, the `conditional_builders[cond_stage_key]` of the training / validation dataset (with its
`get_textual_label(get_category_id(no))` labels). Served as `ldm.models.diffusion.ddpm.Layout2ImgDiffusion`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ldm.models.diffusion.latent_diffusion import LatentDiffusion
from ldm.util import ConfigError, instantiate_from_config

logger = logging.getLogger(__name__)

LAYOUT_KEY = "coordinates_bbox"


class Layout2ImgDiffusion(LatentDiffusion):
    """LatentDiffusion conditioned on bounding-box layouts (`cond_stage_key` must be 'coordinates_bbox')."""

    def __init__(self, cond_stage_key: str, *args: Any, bbox_tokenizer_config: Any = None, **kwargs: Any):
        if cond_stage_key != LAYOUT_KEY:
            raise ConfigError(f"model.params.cond_stage_key: Layout2ImgDiffusion reads '{LAYOUT_KEY}', got "
                              f"'{cond_stage_key}'")
        super().__init__(*args, cond_stage_key=cond_stage_key, **kwargs)
        if bbox_tokenizer_config is not None:
            self.bbox_tokenizer = instantiate_from_config(bbox_tokenizer_config)

    def layout_reader(self) -> tuple[Any, Callable[[int], str]]:
        """(the object that reads and plots layouts, its class-label function): bbox_tokenizer_config's, else the
        current split's dataset builder as the original used it."""
        if self.bbox_tokenizer is not None:
            return self.bbox_tokenizer, self.bbox_tokenizer.label
        trainer = getattr(self, "_trainer", None)
        datasets = getattr(getattr(trainer, "datamodule", None), "datasets", None) or {}
        dataset = datasets.get("train" if self.training else "validation")
        builder = getattr(dataset, "conditional_builders", {}).get(self.cond_stage_key)
        if builder is None:
            raise ValueError("Layout2ImgDiffusion.log_images draws the layouts with a BoundingBoxLayout: set "
                             "model.params.bbox_tokenizer_config (target ldm.modules.encoders.layout.BoundingBoxLayout)"
                             " or train on a dataset with conditional_builders['coordinates_bbox']")
        return builder, lambda no: dataset.get_textual_label(dataset.get_category_id(no))

    @torch.no_grad()
    def log_images(self, batch: dict, N: int = 8, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """LatentDiffusion's logs plus `bbox_image`: the first N layouts drawn at the inputs' size."""
        logs = super().log_images(batch, N, *args, **kwargs)
        reader, label = self.layout_reader()
        height, width = logs["inputs"].shape[-2:]
        logs["bbox_image"] = torch.stack([reader.plot(tokens.detach().cpu(), label, (width, height))
                                          for tokens in batch[self.cond_stage_key][:N]]).to(self.device)
        return logs
