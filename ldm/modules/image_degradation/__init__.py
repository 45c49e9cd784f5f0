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


class _Degradation:
    """A named degradation bound to its scale factor (a class, not a closure, so datasets stay picklable)."""

    def __init__(self, name: str, downscale_f: int):
        self.name, self.downscale_f = name, int(downscale_f)

    def __call__(self, image: np.ndarray, rng: Optional[Rng] = None) -> np.ndarray:
        if self.name in BSRGAN_DEGRADATIONS:
            return BSRGAN_DEGRADATIONS[self.name](image, sf=self.downscale_f, rng=rng)["image"]
        return downscale(image, (image.shape[0] // self.downscale_f, image.shape[1] // self.downscale_f), self.name)


def make_degradation(name: str, downscale_f: int, key: str = "degradation") -> Degradation:
    """f(uint8 HWC image, rng=None) -> the uint8 image `downscale_f` times smaller, degraded as `name`."""
    if name not in DEGRADATIONS:
        raise ValueError(f"{key}={name!r} is not known; expected one of {list(DEGRADATIONS)}")
    return _Degradation(name, downscale_f)
