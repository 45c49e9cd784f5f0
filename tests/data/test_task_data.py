"""Task data for the built-in shapes: seeded inpainting masks and super-resolution pairs."""
import numpy as np
import pytest

from ldm.data.inpainting import InpaintingDataset, random_mask
from ldm.data.shapes import ShapesSR, ShapesTrain


@pytest.mark.parametrize("kind", ["box", "brush", "mixed"])
def test_random_masks_are_binary_partial_and_seeded(kind):
    masks = [random_mask(32, 24, np.random.default_rng(s), kind) for s in range(10)]
    for m in masks:
        assert m.shape == (32, 24) and m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0}
        assert 0.0 < m.mean() < 1.0
    assert len({m.tobytes() for m in masks}) == 10
    np.testing.assert_array_equal(random_mask(32, 24, np.random.default_rng(3), kind), masks[3])


def test_inpainting_dataset_masks_the_image_where_mask_is_one():
    base = ShapesTrain(size=16, length=8)
    ds = InpaintingDataset({"target": "ldm.data.shapes.ShapesTrain", "params": {"size": 16, "length": 8}}, seed=2)
    ex = ds[5]
    assert len(ds) == 8 and ex["mask"].shape == (16, 16, 1) and ex["caption"] == base[5]["caption"]
    hole = ex["mask"][..., 0] == 1
    assert hole.any() and (ex["masked_image"][hole] == 0).all()
    np.testing.assert_array_equal(ex["masked_image"][~hole], base[5]["image"][~hole])
    np.testing.assert_array_equal(ds[5]["mask"], ex["mask"])  # a function of (seed, index)
    assert not np.array_equal(InpaintingDataset(base, seed=3)[5]["mask"], ex["mask"])
    assert InpaintingDataset(base, p_drop=1.0)[0]["mask"].all()
    with pytest.raises(KeyError, match="'jpg'"):
        InpaintingDataset(base, image_key="jpg")[0]
    with pytest.raises(ValueError, match="mask_kind='ring'"):
        InpaintingDataset(base, mask_kind="ring")


def test_shapes_sr_pairs():
    ds = ShapesSR(size=16, length=4, degradation="bsrgan", downscale_f=4)
    ex = ds[1]
    assert ex["image"].shape == (16, 16, 3) and ex["LR_image"].shape == (4, 4, 3)
    np.testing.assert_array_equal(ex["image"], ShapesTrain(size=16, length=4)[1]["image"])
    np.testing.assert_array_equal(ds[1]["LR_image"], ex["LR_image"])  # seeded by (seed, split, index)
    assert not np.array_equal(ShapesSR(size=16, length=4, degradation="bsrgan", seed=1)[1]["LR_image"], ex["LR_image"])
    nearest = ShapesSR(size=16, length=4, degradation="cv_nearest", downscale_f=2)[1]
    np.testing.assert_allclose(nearest["LR_image"], nearest["image"][::2, ::2], atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        ShapesSR(size=18, downscale_f=4)
    with pytest.raises(ValueError, match="ShapesSR: degradation='fuzzy'"):
        ShapesSR(size=16, degradation="fuzzy")
