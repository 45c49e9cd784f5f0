"""Procedural shapes: determinism, format, captions vs attributes, coverage of the palette, splits, the judge."""
import hashlib

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.data.shapes import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    ShapesDataset,
    ShapesTrain,
    ShapesValidation,
    class_label_of,
    judge_shape_image,
)
from ldm.util import instantiate_from_config


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def test_same_seed_and_index_give_identical_pixels_and_different_indices_differ():
    a, b = ShapesDataset(size=32, seed=3), ShapesDataset(size=32, seed=3)
    for i in (0, 7, 999):
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
        assert a[i]["caption"] == b[i]["caption"]
    assert len({_digest(a[i]["image"]) for i in range(50)}) == 50
    assert not np.array_equal(a[0]["image"], ShapesDataset(size=32, seed=4)[0]["image"])


@pytest.mark.parametrize("size", [16, 32, 64])
def test_any_resolution_float32_hwc_in_range_with_antialiased_edges(size):
    ds = ShapesDataset(size=size, length=20)
    for i in range(len(ds)):
        ex = ds[i]
        image = ex["image"]
        assert image.shape == (size, size, 3) and image.dtype == np.float32
        assert image.min() >= -1.0 and image.max() <= 1.0
        x0, y0, x1, y1 = ex["bbox"]
        assert 0 < x0 < x1 < size and 0 < y0 < y1 < size  # fully inside, with a margin
        assert 0.35 <= ex["shape_size"] <= 0.70
        assert np.allclose(ex["center"], [(x0 + x1) / 2, (y0 + y1) / 2])
        # Anti-aliasing: some pixels are neither the background nor the shape colour.
        rgb = np.round((image + 1) * 127.5).reshape(-1, 3)
        pure = np.all(rgb == BACKGROUNDS[ex["background"]], axis=1) | np.all(rgb == COLORS[ex["color"]], axis=1)
        assert 0 < (~pure).sum() < pure.sum()


def test_caption_matches_attributes_and_pixels():
    ds = ShapesDataset(size=32, length=60)
    for i in range(len(ds)):
        ex = ds[i]
        assert ex["caption"] == f"a {ex['color']} {ex['shape']} on a {ex['background']} background"
        assert ex["class_label"] == SHAPES.index(ex["shape"]) * len(COLORS) + list(COLORS).index(ex["color"])
        image = np.round((ex["image"] + 1) * 127.5)
        corner = image[0, 0]
        np.testing.assert_array_equal(corner, BACKGROUNDS[ex["background"]])
        cx, cy = (int(v) for v in ex["center"])
        if ex["shape"] != "triangle":  # a triangle's centre pixel may sit near its slanted edges
            np.testing.assert_allclose(image[cy, cx], COLORS[ex["color"]], atol=1)


def test_all_shapes_colours_backgrounds_and_classes_appear_in_500_samples():
    ds = ShapesTrain(size=16, length=500)
    attrs = [ds.attributes(i) for i in range(len(ds))]
    assert {a["shape"] for a in attrs} == set(SHAPES)
    assert {a["color"] for a in attrs} == set(COLORS)
    assert {a["background"] for a in attrs} == set(BACKGROUNDS)
    assert {a["class_label"] for a in attrs} == set(range(len(SHAPES) * len(COLORS)))
    assert len(COLORS) >= 6 and not set(COLORS) & set(BACKGROUNDS)
    assert not set(COLORS.values()) & set(BACKGROUNDS.values())
    assert class_label_of("triangle", "purple") == len(SHAPES) * len(COLORS) - 1


def test_train_and_validation_are_disjoint():
    train, val = ShapesTrain(size=16, length=400), ShapesValidation(size=16, length=400)
    assert not {_digest(train[i]["image"]) for i in range(400)} & {_digest(val[i]["image"]) for i in range(400)}


def test_subsets_keep_global_labels_and_bad_values_are_named():
    ds = ShapesDataset(size=16, length=40, shapes=["square"], colors=["blue", "red"], backgrounds=["black"])
    for i in range(len(ds)):
        ex = ds[i]
        assert ex["shape"] == "square" and ex["color"] in ("blue", "red") and ex["background"] == "black"
        assert ex["class_label"] == class_label_of("square", ex["color"])
    with pytest.raises(ValueError, match="colors"):
        ShapesDataset(colors=["mauve"])
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(split="test")


def test_builds_from_yaml_and_collates():
    config = OmegaConf.create({"target": "ldm.data.shapes.ShapesTrain", "params": {"size": 16, "length": 8}})
    ds = instantiate_from_config(config)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 16, 16, 3) and len(batch["caption"]) == 4
    assert batch["class_label"].dtype == torch.int64


def test_judge_accuracy_on_500_held_out_images_at_32px():
    ds = ShapesValidation(size=32, length=500)
    correct = sum(judge_shape_image(ds[i]["image"]) == (ds[i]["shape"], ds[i]["color"]) for i in range(len(ds)))
    accuracy = correct / len(ds)
    assert accuracy >= 0.97, f"judge accuracy {accuracy:.3f}"


def test_judge_accepts_uint8_chw_tensors_and_rejects_blank_images():
    ex = ShapesValidation(size=32, length=3)[1]
    expected = (ex["shape"], ex["color"])
    uint8 = np.round((ex["image"] + 1) * 127.5).astype(np.uint8)
    assert judge_shape_image(uint8) == expected
    assert judge_shape_image(torch.from_numpy(ex["image"]).permute(2, 0, 1)) == expected
    assert judge_shape_image(np.zeros((32, 32, 3), np.float32)) == (None, None)


def test_judge_tells_shapes_and_colours_apart():
    """Swapping the drawn shape or colour changes the verdict (the judge is not a constant)."""
    from ldm.data.shapes import render_shape

    for shape in SHAPES:
        for color in COLORS:
            pixels = render_shape(shape, color, "gray", (16.0, 15.0), 14.0, 32)
            assert judge_shape_image(pixels) == (shape, color)


def test_judge_ignores_a_faint_halo_around_a_shape():
    """Decoded images ring faintly around edges; a tint under 30% coverage must not turn a triangle into a circle."""
    from ldm.data.shapes import render_shape

    for size, side in ((16, 7.0), (32, 14.0)):
        for color in ("blue", "red"):
            clean = render_shape("triangle", color, "white", (size / 2, size / 2), side, size).astype(np.float64)
            fg, bg = np.array(COLORS[color], np.float64), np.array(BACKGROUNDS["white"], np.float64)
            lo, hi = int(size / 2 - side / 2) - 1, int(size / 2 + side / 2) + 2  # the bounding box and a pixel
            box = np.zeros((size, size), bool)
            box[lo:hi, lo:hi] = True
            haloed = clean.copy()
            tint = box & (np.abs(clean - bg).sum(-1) < 1)  # background pixels around the triangle
            haloed[tint] = bg + 0.25 * (fg - bg)
            assert judge_shape_image(clean.astype(np.uint8)) == ("triangle", color)
            assert judge_shape_image(haloed.round().astype(np.uint8)) == ("triangle", color)
