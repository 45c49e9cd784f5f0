"""BSRGAN degradations: sizes, dtype, seeding, kernels, and the light variant degrading less than the full one."""
import math
import random

import numpy as np
import pytest

from ldm.data.shapes import ShapesTrain
from ldm.modules.image_degradation import DEGRADATIONS, degradation_fn_bsr, degradation_fn_bsr_light, make_degradation
from ldm.modules.image_degradation.bsrgan import BSRGAN, random_blur_kernel
from ldm.modules.image_degradation.bsrgan_light import BSRGAN_LIGHT
from ldm.modules.image_degradation.utils_image import (
    anisotropic_gaussian_kernel,
    calculate_psnr,
    convolve,
    downscale,
    gaussian_kernel,
)

VARIANTS = {"bsrgan": degradation_fn_bsr, "bsrgan_light": degradation_fn_bsr_light}


def shapes_uint8(n, size=64):
    ds = ShapesTrain(size=size)
    return [np.round((ds[i]["image"] + 1.0) * 127.5).astype(np.uint8) for i in range(n)]


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("sf", [2, 4])
def test_output_size_dtype_and_range(name, sf):
    image = np.random.default_rng(0).integers(0, 256, (32, 24, 3), dtype=np.uint8)
    for seed in range(6):
        out = VARIANTS[name](image, sf=sf, rng=random.Random(seed))["image"]
        assert out.shape == (32 // sf, 24 // sf, 3) and out.dtype == np.uint8
    # sizes not divisible by sf are cropped first, as the original's mod-crop
    out = VARIANTS[name](image[:30, :23], sf=4, rng=random.Random(0))["image"]
    assert out.shape == (7, 5, 3)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_seeding(name):
    image = shapes_uint8(1, 32)[0]
    fn = VARIANTS[name]
    random.seed(123)
    a = fn(image, sf=4)["image"]
    random.seed(123)
    b = fn(image, sf=4)["image"]
    np.testing.assert_array_equal(a, b)  # the global generator, seeded, gives the same result
    np.testing.assert_array_equal(fn(image, sf=4, rng=random.Random(5))["image"],
                                  fn(image, sf=4, rng=random.Random(5))["image"])
    outputs = {fn(image, sf=4, rng=random.Random(s))["image"].tobytes() for s in range(6)}
    assert len(outputs) == 6  # every seed degrades differently


def test_kernels_sum_to_one_and_blur():
    for kernel in (gaussian_kernel(7, 1.5), gaussian_kernel(25, 2.0, shift=1.5), gaussian_kernel(5, 0.0),
                   anisotropic_gaussian_kernel(15, 0.7, 5.0, 0.5), anisotropic_gaussian_kernel(9, 0.0, 0.0, 0.0)):
        assert math.isclose(float(kernel.sum()), 1.0, rel_tol=1e-5) and (kernel >= 0).all()
    rng = random.Random(0)
    for settings in (BSRGAN, BSRGAN_LIGHT):
        for _ in range(20):
            kernel = random_blur_kernel(rng, 4, settings)
            assert kernel.shape[0] == kernel.shape[1] and kernel.shape[0] % 2 == 1
            assert math.isclose(float(kernel.sum()), 1.0, rel_tol=1e-5)
    # anisotropic: a kernel stretched along x (theta=0) spreads along columns, not rows
    k = anisotropic_gaussian_kernel(11, 0.0, 8.0, 0.5)
    assert k[5, :].sum() > 3 * k[:, 5].sum()
    # sigma ~ 0 is the identity; a Gaussian keeps a flat image flat and lowers a checkerboard's contrast
    image = np.random.default_rng(1).random((9, 9, 3)).astype(np.float32)
    np.testing.assert_allclose(convolve(image, gaussian_kernel(5, 0.0)), image, atol=1e-6)
    flat = np.full((8, 8, 3), 0.3, np.float32)
    np.testing.assert_allclose(convolve(flat, gaussian_kernel(7, 2.0)), flat, atol=1e-6)
    board = (np.indices((8, 8)).sum(0) % 2)[..., None].repeat(3, -1).astype(np.float32)
    assert convolve(board, gaussian_kernel(5, 1.0)).std() < 0.2 * board.std()


def test_shifted_kernel_centres_the_subsampling_grid():
    # blur with the kernel shifted by (sf-1)/2 then taking every sf-th pixel samples each block's centre
    kernel = gaussian_kernel(25, 0.3, shift=1.5)
    row, col = np.unravel_index(np.argmax(kernel), kernel.shape)
    assert (row, col) in {(10, 10), (11, 11)} and kernel[10, 10] == pytest.approx(kernel[11, 11])


def test_light_variant_degrades_less():
    images = shapes_uint8(8)
    psnr = {}
    for name, fn in VARIANTS.items():
        values = []
        for i, image in enumerate(images):
            out = fn(image, sf=4, rng=random.Random(100 + i))["image"]
            values.append(calculate_psnr(out, downscale(image, 16, "pil_bicubic")))
        psnr[name] = float(np.mean(values))
    assert psnr["bsrgan_light"] > psnr["bsrgan"] + 2.0, psnr


def test_make_degradation_names_and_plain_resizes():
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for name in DEGRADATIONS:
        assert make_degradation(name, 4)(image, random.Random(0)).shape == (4, 4, 3)
    np.testing.assert_array_equal(make_degradation("cv_nearest", 2)(image), image[::2, ::2])
    with pytest.raises(ValueError, match="degradation='blur' is not known"):
        make_degradation("blur", 4)
    with pytest.raises(ValueError, match="uint8 HWC"):
        degradation_fn_bsr(image.astype(np.float32))


def test_degradations_pickle_for_dataloader_workers():
    import pickle

    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    fn = pickle.loads(pickle.dumps(make_degradation("bsrgan_light", 4)))
    np.testing.assert_array_equal(fn(image, random.Random(1)), degradation_fn_bsr_light(image, 4, rng=random.Random(1))["image"])
