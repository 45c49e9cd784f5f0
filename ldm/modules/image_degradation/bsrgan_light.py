"""The light BSRGAN variant: one blur pass with kernels a quarter as wide, mostly plain resizing,
barely visible noise (std 1-2 of 255) and mild JPEG (quality 80-95). See `bsrgan` for the pipeline.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ldm.modules.image_degradation.bsrgan import BLUR, DegradationSettings, degrade
from ldm.modules.image_degradation.utils_image import Rng

BSRGAN_LIGHT = DegradationSettings(
    blur_steps=(BLUR,),
    blur_scale=0.25,
    anisotropic_half_sizes=(1, 5),
    isotropic_half_sizes=(0, 1),
    resize_prob=0.8,
    noise_levels=(1, 2),
    jpeg_quality=(80, 95),
)


def degradation_bsrgan_variant(image: np.ndarray, sf: int = 4, isp_model: Any = None,
                               rng: Rng | None = None) -> dict[str, np.ndarray]:
    """Light BSRGAN degradation of a uint8 HWC image; returns {"image": uint8 HWC of size (H // sf, W // sf)}."""
    return degrade(image, sf, BSRGAN_LIGHT, isp_model=isp_model, rng=rng)
