"""CLIP score (Hessel et al. 2021: 100 x cosine similarity of CLIP image and caption embeddings, averaged; negative
means clipped to 0) with torchmetrics' `CLIPScore`, from a local CLIP folder (a transformers `CLIPModel` directory
with its processor: config, weights, tokenizer and preprocessor_config.json).

The folder is `--clip-model DIR` or `$LDM_CLIP_MODEL`; nothing is downloaded. torchmetrics sums the scores and their
count across processes itself when torch.distributed is initialised.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from ldm.evaluation.common import CLIP_ENV, EvaluationError, metric_name

logger = logging.getLogger(__name__)


def resolve_clip_model(path: str | os.PathLike | None = None, flag: str = "--clip-model") -> tuple[str, str]:
    """(folder, where it came from) of the CLIP model: `path` or $LDM_CLIP_MODEL; one-line EvaluationError else."""
    for given, origin in ((path, flag), (os.environ.get(CLIP_ENV), CLIP_ENV)):
        if given:
            if not os.path.isdir(given):
                raise EvaluationError(f"{origin}: CLIP model folder '{given}' does not exist")
            return os.fspath(given), origin
    raise EvaluationError(f"the CLIP score needs a local CLIP model (a transformers CLIPModel folder with its "
                          f"processor): pass {flag} DIR or set {CLIP_ENV}")


def _embedding(output: object) -> torch.Tensor:
    """The projected embedding of get_image/text_features: the tensor itself (transformers < 5) or the output's
    pooler_output, where transformers >= 5 put the projection."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class EmbeddingCLIP(nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return the projected embeddings as tensors, as
    torchmetrics' CLIPScore expects them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args: object, **kwargs: object) -> torch.Tensor:
        """Projected image embeddings (B, projection_dim)."""
        return _embedding(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: object, **kwargs: object) -> torch.Tensor:
        """Projected caption embeddings (B, projection_dim)."""
        return _embedding(self.model.get_text_features(*args, **kwargs))


class ClipScore:
    """torchmetrics' CLIPScore over a local CLIP folder; `update(images, captions)` per batch, then `compute`."""

    def __init__(self, folder: str, origin: str, device: torch.device | str = "cpu"):
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = EmbeddingCLIP(CLIPModel.from_pretrained(folder)).eval()
            processor = CLIPProcessor.from_pretrained(folder)
        except (OSError, ValueError, TypeError) as err:
            raise EvaluationError(f"{origin}: '{folder}' is not a CLIP model folder with its processor "
                                  f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from err
        self.device = torch.device(device)
        self.metric = CLIPScore(model_name_or_path=lambda: (model, processor)).to(self.device)
        self.metric.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, images: torch.Tensor, captions: Sequence[str]) -> None:
        """Add uint8 (B, 3, H, W) images and their captions."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        self.metric.update(list(images.to(self.device)), [str(c) for c in captions])

    def compute(self, n: int | None = None, suffix: str = "") -> dict[str, float]:
        """{clip_score@n: the mean score} (n: the images seen, over all processes)."""
        count = int(self.metric.n_samples) if n is None else n
        value = float(self.metric.compute())
        return {metric_name("clip_score", count, suffix): value}

    def reset(self) -> None:
        """Forget the images seen."""
        self.metric.reset()
