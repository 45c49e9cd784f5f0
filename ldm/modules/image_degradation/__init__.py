"""Image degradations for super-resolution data: BSRGAN (full and light) and plain resizes.

`degradation_fn_bsr` / `degradation_fn_bsr_light` are the original names of the two BSRGAN variants;
`make_degradation(name, downscale_f)` gives one function uint8 HWC -> uint8 HWC (downscale_f times
smaller) for any name a super-resolution dataset accepts (`DEGRADATIONS`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import numpy as np

from ldm.modules.image_degradation.bsrgan import degradation_bsrgan_variant as degradation_fn_bsr
from ldm.modules.image_degradation.bsrgan_light import degradation_bsrgan_variant as degradation_fn_bsr_light
from ldm.modules.image_degradation.utils_image import RESIZE_DEGRADATIONS, Rng, downscale

BSRGAN_DEGRADATIONS = {"bsrgan": degradation_fn_bsr, "bsrgan_light": degradation_fn_bsr_light}
DEGRADATIONS = tuple(sorted(BSRGAN_DEGRADATIONS)) + RESIZE_DEGRADATIONS

Degradation = Callable[[np.ndarray, Optional[Rng]], np.ndarray]

__all__ = ["DEGRADATIONS", "degradation_fn_bsr", "degradation_fn_bsr_light", "make_degradation"]


def make_degradation(name: str, downscale_f: int, key: str = "degradation") -> Degradation:
    """f(uint8 HWC image, rng=None) -> the uint8 image `downscale_f` times smaller, degraded as `name`."""
    if name in BSRGAN_DEGRADATIONS:
        fn = BSRGAN_DEGRADATIONS[name]
        return lambda image, rng=None: fn(image, sf=downscale_f, rng=rng)["image"]
    if name in RESIZE_DEGRADATIONS:
        return lambda image, rng=None: downscale(
            image, (image.shape[0] // downscale_f, image.shape[1] // downscale_f), name)
    raise ValueError(f"{key}={name!r} is not known; expected one of {list(DEGRADATIONS)}")
