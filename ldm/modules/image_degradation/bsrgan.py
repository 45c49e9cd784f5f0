"""The BSRGAN degradation model (Zhang et al. 2021, "Designing a Practical Degradation Model for Deep
Blind Image Super-Resolution", sec. 3): blur, downsampling, noise and JPEG in a random order.

`degradation_bsrgan_variant(image, sf)` turns a uint8 HWC image into its degraded low-resolution
version, `sf` times smaller: an optional first halving (sf=4 only), then the shuffled steps
blur, blur, downsample (resize by a random factor, or shifted blur + subsampling), resize to the
target size, Gaussian noise, JPEG, camera ISP, and a final JPEG compression. The second resize
always comes after the first. `bsrgan_light` runs the same pipeline with milder settings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ldm.modules.image_degradation.utils_image import (
    Rng,
    add_gaussian_noise,
    anisotropic_gaussian_kernel,
    convolve,
    default_rng,
    gaussian_kernel,
    jpeg_compress,
    resize,
    single2uint,
    uint2single,
)

RESIZE_MODES = ("bilinear", "bicubic", "area")  # the random interpolations (OpenCV's linear, cubic, area)
BLUR, BLUR_2, DOWNSAMPLE, RESIZE_TO_TARGET, NOISE, JPEG, ISP = range(7)


@dataclass(frozen=True)
class DegradationSettings:
    """Strengths and probabilities of one degradation variant."""

    blur_steps: tuple[int, ...] = (BLUR, BLUR_2)  # which of the shuffled steps blur
    blur_scale: float = 1.0  # multiplies the kernel width ranges (4 + sf and 2 + 0.2 sf)
    anisotropic_half_sizes: tuple[int, int] = (2, 11)  # kernel side = 2 k + 3, k uniform in this range
    isotropic_half_sizes: tuple[int, int] = (2, 11)
    resize_prob: float = 0.75  # random-factor resize, else shifted Gaussian blur + subsampling
    noise_levels: tuple[int, int] = (2, 25)  # Gaussian noise std in 0..255 units
    jpeg_quality: tuple[int, int] = (30, 95)
    jpeg_prob: float = 0.9
    halve_prob: float = 0.25  # first halving when sf == 4
    isp_prob: float = 0.25


BSRGAN = DegradationSettings()


def random_blur_kernel(rng: Rng, sf: int, settings: DegradationSettings = BSRGAN) -> np.ndarray:
    """An anisotropic (50%) or isotropic Gaussian kernel of random size and width (BSRGAN, sec. 3.1)."""
    if rng.random() < 0.5:
        width = (4.0 + sf) * settings.blur_scale
        size = 2 * rng.randint(*settings.anisotropic_half_sizes) + 3
        return anisotropic_gaussian_kernel(size, rng.random() * math.pi, width * rng.random(), width * rng.random())
    width = (2.0 + 0.2 * sf) * settings.blur_scale
    size = 2 * rng.randint(*settings.isotropic_half_sizes) + 3
    return gaussian_kernel(size, width * rng.random())


def _random_resize(image: np.ndarray, height: int, width: int, rng: Rng) -> np.ndarray:
    return np.clip(resize(image, height, width, rng.choice(RESIZE_MODES)), 0.0, 1.0)


def _halve(image: np.ndarray, rng: Rng) -> np.ndarray:
    """Halve the size with a random interpolation, or with antialiased bicubic (MATLAB's imresize)."""
    h, w = image.shape[0] // 2, image.shape[1] // 2
    if rng.random() < 0.5:
        return _random_resize(image, h, w, rng)
    return np.clip(resize(image, h, w, "bicubic", antialias=True), 0.0, 1.0)


def _random_downsample(image: np.ndarray, sf: int, rng: Rng, settings: DegradationSettings) -> np.ndarray:
    """Shrink by a factor uniform in [1, 2 sf], or blur with a Gaussian shifted to the sf×sf block centre
    and keep every sf-th pixel."""
    if rng.random() < settings.resize_prob:
        factor = rng.uniform(1.0, 2.0 * sf)
        return _random_resize(image, int(image.shape[0] / factor), int(image.shape[1] / factor), rng)
    kernel = gaussian_kernel(25, rng.uniform(0.1, 0.6 * sf), shift=(sf - 1) / 2.0)
    return np.clip(convolve(image, kernel)[::sf, ::sf], 0.0, 1.0)


def _shuffled_steps(rng: Rng) -> list[int]:
    """The seven steps in random order, with the resize to the target size after the first downsampling."""
    order = rng.sample(range(7), 7)
    i, j = order.index(DOWNSAMPLE), order.index(RESIZE_TO_TARGET)
    if i > j:
        order[i], order[j] = order[j], order[i]
    return order


def degrade(image: np.ndarray, sf: int, settings: DegradationSettings, isp_model: Any = None,
            rng: Rng | None = None) -> dict[str, np.ndarray]:
    """Run the degradation pipeline with the given settings; returns {"image": uint8 HWC, sf times smaller}."""
    rng = default_rng(rng)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"degradation expects a uint8 HWC image, got {image.dtype} of shape {image.shape}")
    sf = int(sf)
    height, width = image.shape[0] - image.shape[0] % sf, image.shape[1] - image.shape[1] % sf
    if sf < 1 or height == 0 or width == 0:
        raise ValueError(f"degradation: sf={sf} must be >= 1 and at most the image size {image.shape[:2]}")
    img = uint2single(image[:height, :width])
    hq = img.copy()
    target = (height // sf, width // sf)
    if sf == 4 and rng.random() < settings.halve_prob:
        img, sf = _halve(img, rng), 2
    for step in _shuffled_steps(rng):
        if step in settings.blur_steps:
            img = convolve(img, random_blur_kernel(rng, sf, settings))
        elif step == DOWNSAMPLE:
            img = _random_downsample(img, sf, rng, settings)
        elif step == RESIZE_TO_TARGET:
            img = _random_resize(img, *target, rng)
        elif step == NOISE:
            img = add_gaussian_noise(img, rng, settings.noise_levels)
        elif step == JPEG:
            if rng.random() < settings.jpeg_prob:
                img = jpeg_compress(img, rng.randint(*settings.jpeg_quality))
        elif step == ISP and isp_model is not None and rng.random() < settings.isp_prob:
            img, hq = isp_model.forward(img.copy(), hq)
    img = jpeg_compress(img, rng.randint(*settings.jpeg_quality))
    return {"image": single2uint(img)}


def degradation_bsrgan_variant(image: np.ndarray, sf: int = 4, isp_model: Any = None,
                               rng: Rng | None = None) -> dict[str, np.ndarray]:
    """BSRGAN degradation of a uint8 HWC image; returns {"image": uint8 HWC of size (H // sf, W // sf)}.

    `isp_model` (optional) is a camera-pipeline model whose `forward(img, hq)` returns (img, hq);
    `rng` (an addition) is a `random.Random` to draw from instead of the global `random` module.
    """
    return degrade(image, sf, BSRGAN, isp_model=isp_model, rng=rng)
