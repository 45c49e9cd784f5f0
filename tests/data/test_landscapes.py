"""Landscape + semantic-map reader (RFWTrain / RFWValidation) on a tiny fixture: one-hot maps aligned with crops."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.landscapes import RFWTrain, RFWValidation


@pytest.fixture()
def rfw(tmp_path):
    """data/rfw/images/*.jpg|png, data/rfw/segmentations/*.png (labels = column index), lists."""
    (tmp_path / "images").mkdir()
    (tmp_path / "segmentations").mkdir()
    for i in range(3):
        rgb = np.zeros((12, 16, 3), np.uint8)
        rgb[..., 0] = np.arange(16) * 10  # red encodes the column, like the label map
        Image.fromarray(rgb).save(tmp_path / "images" / f"land{i}.png")
        Image.fromarray(np.tile(np.arange(16, dtype=np.uint8), (12, 1)), mode="L").save(
            tmp_path / "segmentations" / f"land{i}.png")
    (tmp_path / "rfw_train.txt").write_text("land0.png\nland1.png\n")
    (tmp_path / "rfw_validation.txt").write_text("land2.png\n")
    return tmp_path


def test_validation_centre_crop_keeps_image_and_labels_aligned(rfw):
    val = RFWValidation(size=12, crop_size=8, segmentation_to_float32=True, data_root=str(rfw))
    ex = val[0]
    assert ex["image"].shape == (8, 8, 3) and ex["segmentation"].shape == (8, 8, 182)
    assert ex["segmentation"].dtype == np.float32 and np.all(ex["segmentation"].sum(-1) == 1)
    labels = ex["segmentation"].argmax(-1)
    assert labels[0].tolist() == list(range(4, 12))  # the centre 8 of 16 columns
    red = np.round((ex["image"][..., 0] + 1) * 127.5)
    np.testing.assert_array_equal(red, labels * 10)


def test_training_crops_are_random_but_aligned(rfw, monkeypatch):
    monkeypatch.setenv("LDM_RFW_ROOT", str(rfw))
    train = RFWTrain(size=12, crop_size=8)
    assert len(train) == 2 and train.random_crop
    torch.manual_seed(0)
    starts = set()
    for _ in range(8):
        ex = train[0]
        labels = ex["segmentation"].argmax(-1)
        assert ex["segmentation"].dtype == np.uint8
        np.testing.assert_array_equal(np.round((ex["image"][..., 0] + 1) * 127.5), labels * 10)
        starts.add(int(labels[0, 0]))
    assert len(starts) > 1


def test_missing_folders_and_bad_maps_are_one_line_errors(rfw, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        RFWTrain(size=8, data_root=str(tmp_path / "nowhere"))
    message = str(info.value)
    assert "nowhere/images not found" in message and "segmentations" in message and "\n" not in message
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(rfw / "segmentations" / "land2.png")
    with pytest.raises(ValueError, match="has mode RGB; expected 8-bit labels"):
        RFWValidation(data_root=str(rfw))[0]
    with pytest.raises(ValueError, match="crop_size=16 is larger than size=8"):
        RFWValidation(size=8, crop_size=16, data_root=str(rfw))
