"""Image operations shared by the degradation pipelines: blur kernels, convolution, resizing, noise, JPEG.

Images are HWC numpy arrays; the pipelines work in float32 in [0, 1] and convert from/to uint8 at
their ends. Randomness is passed in explicitly as a `random.Random`-like object (the `random`
module itself qualifies), so one seed fixes every draw; array noise comes from a numpy Generator
seeded by that object.
"""
from __future__ import annotations

import io
import math
import random as _random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Rng = Any  # random.Random or the `random` module: anything with random/randint/uniform/choice/getrandbits

# The smallest kernel variance we evaluate: below it a Gaussian is a delta on the pixel grid anyway.
_MIN_VARIANCE = 1e-6

# Degradations that are plain resizes. `cv_*` follow OpenCV's resize (no antialiasing when shrinking),
# reproduced with torch's interpolate; `pil_*` use PIL's filters (antialiased).
TORCH_RESIZE_MODES = {"cv_nearest": "nearest", "cv_bilinear": "bilinear", "cv_bicubic": "bicubic", "cv_area": "area"}
PIL_RESIZE_FILTERS = {
    "cv_lanczos": Image.Resampling.LANCZOS,
    "pil_nearest": Image.Resampling.NEAREST,
    "pil_bilinear": Image.Resampling.BILINEAR,
    "pil_bicubic": Image.Resampling.BICUBIC,
    "pil_box": Image.Resampling.BOX,
    "pil_hamming": Image.Resampling.HAMMING,
    "pil_lanczos": Image.Resampling.LANCZOS,
}
RESIZE_DEGRADATIONS = tuple(sorted(TORCH_RESIZE_MODES) + sorted(PIL_RESIZE_FILTERS))


def uint2single(image: np.ndarray) -> np.ndarray:
    """uint8 HWC in 0..255 -> float32 HWC in [0, 1]."""
    return np.asarray(image, dtype=np.float32) / 255.0


def single2uint(image: np.ndarray) -> np.ndarray:
    """float HWC in [0, 1] -> uint8 HWC, rounded and clipped."""
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def numpy_rng(rng: Rng) -> np.random.Generator:
    """A numpy Generator seeded from `rng`, so array noise follows the same seed as the scalar draws."""
    return np.random.default_rng(rng.getrandbits(64))


def _normalised(kernel: np.ndarray) -> np.ndarray:
    return (kernel / kernel.sum()).astype(np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets (x, y) from the centre of a size×size kernel."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    return np.meshgrid(offsets, offsets)


def gaussian_kernel(size: int, sigma: float, shift: float = 0.0) -> np.ndarray:
    """An isotropic Gaussian kernel (MATLAB's fspecial('gaussian')) summing to 1, optionally centred
    `shift` pixels up and left of the kernel's centre."""
    x, y = _grid(size)
    variance = max(float(sigma) ** 2, _MIN_VARIANCE)
    return _normalised(np.exp(-((x + shift) ** 2 + (y + shift) ** 2) / (2.0 * variance)))


def anisotropic_gaussian_kernel(size: int, theta: float, l1: float, l2: float) -> np.ndarray:
    """A Gaussian kernel summing to 1 whose covariance has eigenvalues l1, l2 along axes rotated by `theta`
    (the anisotropic kernels of Zhang et al. 2021, BSRGAN, sec. 3.1)."""
    c, s = math.cos(theta), math.sin(theta)
    rotation = np.array([[c, -s], [s, c]])
    inverse_eigen = np.diag([1.0 / max(l1, _MIN_VARIANCE), 1.0 / max(l2, _MIN_VARIANCE)])
    precision = rotation @ inverse_eigen @ rotation.T
    x, y = _grid(size)
    points = np.stack([x, y], axis=-1)
    mahalanobis = np.einsum("...i,ij,...j->...", points, precision, points)
    return _normalised(np.exp(-0.5 * mahalanobis))


def convolve(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve every channel of an HWC float image with a 2-D kernel, mirror-padded ('d c b | a b c d | c b a')."""
    kh, kw = kernel.shape
    top, left = (kh - 1) // 2, (kw - 1) // 2
    padded = np.pad(image, ((top, kh - 1 - top), (left, kw - 1 - left), (0, 0)), mode="reflect")
    x = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1), dtype=np.float32))[:, None]
    weight = torch.from_numpy(np.ascontiguousarray(kernel[::-1, ::-1], dtype=np.float32))[None, None]
    return F.conv2d(x, weight)[:, 0].numpy().transpose(1, 2, 0)


def resize(image: np.ndarray, height: int, width: int, mode: str, antialias: bool = False) -> np.ndarray:
    """Resize an HWC float image with torch's interpolate ('nearest', 'bilinear', 'bicubic', 'area')."""
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))[None]
    kwargs: dict[str, Any] = {}
    if mode in ("bilinear", "bicubic"):
        kwargs = {"align_corners": False, "antialias": antialias}
    y = F.interpolate(x, size=(max(int(height), 1), max(int(width), 1)), mode=mode, **kwargs)
    return y[0].numpy().transpose(1, 2, 0)


def downscale(image: Image.Image | np.ndarray, size: int | tuple[int, int], degradation: str) -> np.ndarray:
    """A uint8 HWC array of `image` resized to `size` (side, or (height, width)) with a named plain resize."""
    height, width = (size, size) if isinstance(size, int) else size
    if degradation in PIL_RESIZE_FILTERS:
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
        return np.asarray(pil.resize((width, height), resample=PIL_RESIZE_FILTERS[degradation]))
    if degradation not in TORCH_RESIZE_MODES:
        raise ValueError(f"degradation={degradation!r} is not a plain resize; expected one of {RESIZE_DEGRADATIONS}")
    x = np.asarray(image, dtype=np.float32)
    y = resize(x, height, width, TORCH_RESIZE_MODES[degradation])
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


def add_gaussian_noise(image: np.ndarray, rng: Rng, level_range: tuple[int, int]) -> np.ndarray:
    """Additive Gaussian noise of a std drawn from `level_range` (in 0..255 units): per channel (40%),
    grey (40%), or channel-correlated with a random covariance (20%); clipped to [0, 1]
    (BSRGAN, sec. 3.3)."""
    sigma = rng.randint(*level_range) / 255.0
    branch = rng.random()
    gen = numpy_rng(rng)
    h, w, c = image.shape
    if branch > 0.6:
        noise = gen.normal(0.0, sigma, (h, w, c))
    elif branch < 0.4:
        noise = gen.normal(0.0, sigma, (h, w, 1))
    else:
        # covariance sigma^2 U^T D U with a random orthonormal U and D = diag(uniform(0, 1))
        basis, _ = np.linalg.qr(gen.random((c, c)))
        factor = basis.T * np.sqrt(gen.random(c))
        noise = gen.standard_normal((h, w, c)) @ factor.T * sigma
    return np.clip(image + noise.astype(np.float32), 0.0, 1.0)


def jpeg_compress(image: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip an HWC float image in [0, 1] through baseline JPEG at `quality` (PIL, 4:2:0 chroma)."""
    buffer = io.BytesIO()
    Image.fromarray(single2uint(image)).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return uint2single(np.asarray(decoded.convert("RGB")))


def calculate_psnr(a: np.ndarray, b: np.ndarray, border: int = 0) -> float:
    """PSNR in dB between two uint8 images (inf when identical), ignoring `border` pixels at each edge."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"calculate_psnr: images differ in shape {a.shape} vs {b.shape}")
    if border:
        a, b = a[border:-border, border:-border], b[border:-border, border:-border]
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 20.0 * math.log10(255.0 / math.sqrt(mse))


def default_rng(rng: Rng | None) -> Rng:
    """`rng`, or Python's global `random` module (which PyTorch seeds in every DataLoader worker)."""
    return _random if rng is None else rng
