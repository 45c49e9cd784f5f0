"""Scores for models trained on the procedural shapes (`ldm.data.shapes`).

- caption adherence: the share of generated images whose shape and colour, judged from pixels by
  `judge_shape_image`, are the ones their caption asks for (overall, per shape, per colour);
- PSNR of an autoencoder's reconstructions of held-out shapes (peak signal-to-noise ratio,
  10·log10(peak² / MSE), averaged over images).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from ldm.data.shapes import BACKGROUNDS, COLORS, SHAPES, judge_shape_image

logger = logging.getLogger(__name__)

ImageLike = Union[np.ndarray, torch.Tensor, Image.Image]
_CAPTION = re.compile(r"^a (?P<color>\w+) (?P<shape>\w+) on a (?P<background>\w+) background$")


def parse_caption(caption: str) -> tuple[str, str, str]:
    """(shape, colour, background) of a shapes caption such as 'a red circle on a white background'."""
    match = _CAPTION.match(caption.strip().lower())
    if match is None or match["shape"] not in SHAPES or match["color"] not in COLORS \
            or match["background"] not in BACKGROUNDS:
        raise ValueError(f"caption {caption!r} is not of the form 'a <colour> <shape> on a <background> background' "
                         f"with a colour in {list(COLORS)}, a shape in {list(SHAPES)} and a background in "
                         f"{list(BACKGROUNDS)}")
    return match["shape"], match["color"], match["background"]


@dataclass
class AdherenceScore:
    """Caption adherence of a set of images: hits and counts overall, per asked shape and per asked colour."""

    hits: int = 0
    total: int = 0
    per_shape: dict[str, list[int]] = field(default_factory=dict)  # shape -> [hits, total]
    per_color: dict[str, list[int]] = field(default_factory=dict)  # colour -> [hits, total]
    judged: list[tuple[Any, Any]] = field(default_factory=list)  # (shape, colour) read from each image

    @property
    def overall(self) -> float:
        """Share of images that match their caption in both shape and colour."""
        return self.hits / self.total if self.total else 0.0

    @staticmethod
    def _rates(table: dict[str, list[int]]) -> dict[str, float]:
        return {key: hits / total for key, (hits, total) in table.items() if total}

    def shape_rates(self) -> dict[str, float]:
        """Adherence (shape and colour right) of the images whose caption asked for each shape."""
        return self._rates(self.per_shape)

    def color_rates(self) -> dict[str, float]:
        """Adherence (shape and colour right) of the images whose caption asked for each colour."""
        return self._rates(self.per_color)

    def report(self) -> str:
        """A few human-readable lines: overall, per shape, per colour."""
        def line(rates: dict[str, float]) -> str:
            return "  ".join(f"{k} {100 * v:.0f}%" for k, v in rates.items())

        return (f"caption adherence: {100 * self.overall:.1f}% ({self.hits}/{self.total})\n"
                f"  per shape:  {line(self.shape_rates())}\n"
                f"  per colour: {line(self.color_rates())}")


def caption_adherence(images: Iterable[ImageLike], captions: Sequence[str]) -> AdherenceScore:
    """Judge each image's shape and colour from pixels and compare them with its caption's."""
    score = AdherenceScore()
    images = list(images)
    if len(images) != len(captions):
        raise ValueError(f"caption_adherence: {len(images)} images but {len(captions)} captions")
    for image, caption in zip(images, captions):
        shape, color, _ = parse_caption(caption)
        judged = judge_shape_image(image)
        hit = int(judged == (shape, color))
        score.judged.append(judged)
        score.hits += hit
        score.total += 1
        for table, key in ((score.per_shape, shape), (score.per_color, color)):
            counts = table.setdefault(key, [0, 0])
            counts[0] += hit
            counts[1] += 1
    return score


def psnr(images: torch.Tensor, references: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB, 10·log10(data_range² / MSE), of image batches (default range: [-1, 1] images).

    Identical images give +inf.
    """
    if images.shape != references.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(images.shape)} vs {tuple(references.shape)}")
    diff = images.double() - references.double()
    mse = diff.pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


@torch.no_grad()
def reconstruct(autoencoder: Any, dataset: Any, n: int = 256, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, reconstructions), both (n, 3, H, W) in [-1, 1], of the first `n` images of `dataset` (examples
    with an HWC `image` in [-1, 1]) through `autoencoder` (posterior mean, outputs clamped to [-1, 1])."""
    n = min(n, len(dataset))
    if n == 0:
        raise ValueError("reconstruct: the dataset is empty")
    inputs, outputs = [], []
    was_training = autoencoder.training
    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    try:
        for start in range(0, n, batch_size):
            batch = [dataset[i]["image"] for i in range(start, min(start + batch_size, n))]
            x = torch.stack([torch.as_tensor(b) for b in batch]).permute(0, 3, 1, 2).float().to(device)
            z = autoencoder.encode(x)
            z = z if isinstance(z, torch.Tensor) else z.mode()  # a posterior: its mean
            inputs.append(x.cpu())
            outputs.append(autoencoder.decode(z).clamp(-1, 1).cpu())
    finally:
        autoencoder.train(was_training)
    return torch.cat(inputs), torch.cat(outputs)


def autoencoder_psnr(autoencoder: Any, dataset: Any, n: int = 256, batch_size: int = 64) -> float:
    """Mean PSNR (dB) of `autoencoder` reconstructing the first `n` images of `dataset` (see `reconstruct`)."""
    inputs, outputs = reconstruct(autoencoder, dataset, n, batch_size)
    return float(psnr(outputs, inputs).mean())


def autoencoder_scores(autoencoder: Any, dataset: Any, n: int = 256, batch_size: int = 64) -> tuple[float, AdherenceScore]:
    """(mean PSNR in dB, caption adherence of the uint8 reconstructions) of `autoencoder` on the first `n` images
    of `dataset`: the first stage's quality, and the most an LDM decoding through it can reach on the judge."""
    from ldm.inference import to_uint8

    inputs, outputs = reconstruct(autoencoder, dataset, n, batch_size)
    captions = [dataset[i]["caption"] for i in range(len(inputs))]
    return float(psnr(outputs, inputs).mean()), caption_adherence(list(to_uint8(outputs)), captions)
