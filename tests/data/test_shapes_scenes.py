"""ShapesScenes: several shapes per image with their layout tokens and label map, deterministic, consistent with
the pixels; the single-shape datasets are unchanged."""
import hashlib

import numpy as np
import pytest
import torch

from ldm.data.shapes import (
    COLORS,
    SEGMENTATION_LABELS,
    SHAPES,
    ShapesScenes,
    ShapesScenesTrain,
    ShapesScenesValidation,
    ShapesTrain,
    class_label_of,
    judge_shape_image,
)
from ldm.modules.encoders.layout import BoundingBoxLayout


def test_scenes_are_deterministic_and_hold_one_to_three_distinct_coloured_shapes():
    a, b = ShapesScenes(size=32, length=200), ShapesScenes(size=32, length=200)
    counts = set()
    for i in range(0, 200, 7):
        x, y = a[i], b[i]
        assert np.array_equal(x["image"], y["image"]) and x["caption"] == y["caption"]
        n = x["n_objects"]
        counts.add(n)
        labels = x["class_labels"][:n]
        assert (x["class_labels"][n:] == -1).all() and (labels >= 0).all()
        assert len({int(label) % len(COLORS) for label in labels}) == n  # distinct colours
        assert x["caption"].count(" a ") + x["caption"].startswith("a ") - 1 == n  # "a <colour> <shape>" each
    assert counts == {1, 2, 3}
    assert not np.array_equal(ShapesScenesTrain(size=16)[0]["image"], ShapesScenesValidation(size=16)[0]["image"])


def test_label_map_matches_the_pixels_and_the_boxes():
    ds = ShapesScenes(size=32, length=40, max_overlap=0.0)
    for i in range(40):
        ex = ds[i]
        labels, image = ex["segmentation_labels"], ex["image"]
        assert labels.shape == (32, 32) and ex["segmentation"].shape == (32, 32, len(SEGMENTATION_LABELS))
        assert np.array_equal(ex["segmentation"].argmax(-1), labels)
        from ldm.data.shapes import BACKGROUNDS

        plain = np.asarray(BACKGROUNDS[ex["background"]], dtype=np.float32) / 127.5 - 1
        exact = (np.abs(image[labels == 0] - plain).max(-1) < 1e-6).mean()
        assert exact > 0.85  # label 0 is the background colour but at anti-aliased edges
        n = ex["n_objects"]
        for k in range(n):
            x0, y0, x1, y1 = ex["bboxes"][k]
            if any(min(x1, b[2]) > max(x0, b[0]) and min(y1, b[3]) > max(y0, b[1]) for b in ex["bboxes"][k + 1:n]):
                continue  # partly covered by a shape drawn later
            shape = SHAPES[int(ex["class_labels"][k]) // len(COLORS)]
            inside = np.zeros_like(labels, dtype=bool)
            inside[int(np.ceil(y0)):int(y1), int(np.ceil(x0)):int(x1)] = True
            assert (labels[inside] == 1 + SHAPES.index(shape)).mean() > 0.4  # the box holds its shape's label
        assert set(np.unique(labels)) <= {0} | {1 + SHAPES.index(SHAPES[int(c) // len(COLORS)])
                                              for c in ex["class_labels"][:ex["n_objects"]]}


def test_one_object_scenes_are_judged_as_their_caption():
    ds = ShapesScenes(size=32, length=30, max_objects=1)
    for i in range(30):
        ex = ds[i]
        shape = SHAPES[int(ex["class_labels"][0]) // len(COLORS)]
        color = list(COLORS)[int(ex["class_labels"][0]) % len(COLORS)]
        assert judge_shape_image(ex["image"]) == (shape, color)


def test_layout_tokens_read_back_to_the_objects():
    ds = ShapesScenes(size=16, length=20)
    reader = BoundingBoxLayout(21, 3, 256)
    for i in range(20):
        ex = ds[i]
        tokens = ex["coordinates_bbox"]
        assert tokens.dtype == torch.long and tokens.shape == (11,)
        objects, crop = reader.inverse_build(tokens)
        assert [obj.category_no for obj, _ in objects] == ex["class_labels"][:ex["n_objects"]].tolist()
        assert crop == (0.0, 0.0, 1.0, 1.0)
        for (_, (x0, y0, w, h)), box in zip(objects, ex["bboxes"]):
            np.testing.assert_allclose([x0, y0, x0 + w, y0 + h], box / 16, atol=0.5 / 15 + 1e-6)  # grid rounding
    assert ds.layout_builder.label(class_label_of("triangle", "blue")) == "blue triangle"


def test_layout_build_is_the_inverse_of_reading():
    layout = BoundingBoxLayout(5, 3, 100)
    tokens = layout.build([(2, (1 / 9, 2 / 9, 4 / 9, 3 / 9)), (4, (0.0, 0.0, 1.0, 5 / 9))], crop=(1 / 9, 0, 7 / 9, 1))
    assert tokens.tolist() == [2, 21, 55, 4, 0, 59, 99, 99, 99, 1, 98]
    objects, crop = layout.inverse_build(tokens)
    assert [o.category_no for o, _ in objects] == [2, 4]
    with pytest.raises(ValueError, match="at most 3"):
        layout.build([(0, (0, 0, 1, 1))] * 4)
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        layout.build([(5, (0, 0, 1, 1))])


def test_single_shape_datasets_are_unchanged():
    """The scenes use their own random stream: ShapesTrain's pixels are those it always drew."""
    digest = hashlib.sha1(np.concatenate([ShapesTrain(size=16)[i]["image"] for i in range(8)]).tobytes()).hexdigest()
    assert digest == EXPECTED_SHAPES_DIGEST


EXPECTED_SHAPES_DIGEST = "10116d6f2138c8ccf26bde3d9df6a0be5888ba9d"  # main before ShapesScenes existed


def test_depth_is_zero_on_the_background_and_nearer_for_shapes_drawn_later():
    ds = ShapesScenes(size=32, length=30)
    for i in range(30):
        ex, truth = ds[i], ds.attributes(i)
        depth, labels = ex["depth"][0], ex["segmentation_labels"]
        assert ex["depth"].shape == (1, 32, 32) and ex["depth"].dtype == np.float32
        assert depth[labels == 0].mean() < 0.1 and (depth[labels > 0] > 0.1).all()
        levels = [obj["depth"] for obj in truth["objects"]]
        assert levels == sorted(levels) and 0.3 <= levels[0] and levels[-1] <= 1.0
        last = truth["objects"][-1]  # drawn on top: its centre shows its own depth
        cx, cy = (int(v) for v in last["center"])
        assert depth[cy, cx] == pytest.approx(last["depth"], abs=1e-5)
