"""Shared data helpers: seeded splits, colour parsing, crops, the iterable base class."""
import numpy as np
import pytest
from PIL import Image

from ldm.data.base import Txt2ImgIterableBaseDataset, crop_square, parse_rgb, resize_shorter_side, split_indices


def test_split_indices_partition_and_determinism():
    train, val = split_indices(100, "train", 0.1, seed=5), split_indices(100, "validation", 0.1, seed=5)
    assert len(val) == 10 and sorted(train + val) == list(range(100))
    assert split_indices(100, "validation", 0.1, seed=5) == val != split_indices(100, "validation", 0.1, seed=6)
    assert split_indices(3, "validation", 0.01, seed=0) and split_indices(3, "all", 0.5, seed=0) == [0, 1, 2]
    with pytest.raises(ValueError, match="split"):
        split_indices(10, "test", 0.1, seed=0)


def test_parse_rgb_forms_and_errors():
    assert parse_rgb("white") == (255, 255, 255) == parse_rgb("#ffffff") == parse_rgb([255, 255, 255])
    with pytest.raises(ValueError, match="bg"):
        parse_rgb([300, 0, 0], key="bg")


def test_resize_shorter_side_and_crop():
    image = Image.new("RGB", (40, 20))
    assert resize_shorter_side(image, 10).size == (20, 10)
    assert crop_square(image, 20).size == (20, 20) and crop_square(image, 50).size == (20, 20)


def test_iterable_base_keeps_the_original_attributes():
    class Stream(Txt2ImgIterableBaseDataset):
        def __iter__(self):
            yield {"image": np.zeros((2, 2, 3), np.float32), "caption": ""}

    stream = Stream(num_records=7, valid_ids=[1, 2], size=64)
    assert len(stream) == 7 and stream.sample_ids == [1, 2] and stream.size == 64
    assert next(iter(stream))["caption"] == ""
