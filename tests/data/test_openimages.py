"""Open Images readers on a tiny fixture in the Open Images V6 layout: full-image crops, super-resolution pairs and
the bounding-box token sequences of the layout-to-image model, checked against hand-computed tokens."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.openimages import (
    BoundingBoxTokens,
    FullOpenImagesTrain,
    FullOpenImagesValidation,
    OpenImagesBBoxTrain,
    OpenImagesBBoxValidation,
    SuperresOpenImagesAdvancedTrain,
)

HEADER = "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside\n"


@pytest.fixture()
def openimages(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_OPENIMAGES_ROOT", str(tmp_path))
    rng = np.random.default_rng(0)
    for split, ids in (("train", ["000a", "000b", "000c"]), ("validation", ["0v01", "0v02"])):
        (tmp_path / split).mkdir()
        for image_id in ids:
            Image.fromarray(rng.integers(0, 256, size=(10, 20, 3), dtype=np.uint8)).save(tmp_path / split / f"{image_id}.jpg")
    (tmp_path / "class-descriptions-boxable.csv").write_text("/m/cat,Cat\n/m/dog,Dog\n/m/car,Car\n")
    rows = [  # 0v01: a grouped dog inside the centre crop and a cat outside it; 0v02: one object only (dropped)
        "0v01,xclick,/m/dog,1,0.3,0.5,0.2,0.6,0,0,1,0,0",
        "0v01,xclick,/m/cat,1,0.0,0.2,0.1,0.9,0,0,0,0,0",
        "0v02,xclick,/m/car,1,0.1,0.9,0.1,0.9,0,0,0,0,0",
        "0v01,xclick,/m/unknown,1,0.1,0.9,0.1,0.9,0,0,0,0,0",  # a class outside the class file: ignored
    ]
    (tmp_path / "validation-annotations-bbox.csv").write_text(HEADER + "\n".join(rows) + "\n")
    (tmp_path / "oidv6-train-annotations-bbox.csv").write_text(HEADER + "\n".join(r.replace("0v01", "000a") for r in rows[:2]) + "\n")
    return tmp_path


def test_full_open_images_resize_then_crop(openimages):
    train, val = FullOpenImagesTrain(size=8, crop_size=6), FullOpenImagesValidation(size=10, crop_size=10)
    assert len(train) == 3 and len(val) == 2
    assert train[0]["image"].shape == (6, 6, 3)
    source = np.asarray(Image.open(openimages / "validation" / "0v01.jpg"), np.float32) / 127.5 - 1
    np.testing.assert_allclose(val[0]["image"], source[:, 5:15], atol=1e-6)  # 20 x 10: centre 10 x 10, no resize
    with pytest.raises(ValueError, match="crop_size=12 is larger than size=8"):
        FullOpenImagesTrain(size=8, crop_size=12)


def test_superres_pairs_from_open_images(openimages):
    ds = SuperresOpenImagesAdvancedTrain(size=8, degradation="bsrgan_light", downscale_f=4, min_crop_f=0.5,
                                         max_crop_f=1.0, random_crop=True)
    ex = ds[0]
    assert len(ds) == 3 and ex["image"].shape == (8, 8, 3) and ex["LR_image"].shape == (2, 2, 3)
    assert ex["file_path_"].endswith("train/000a.jpg")


def test_validation_tokens_equal_the_hand_computed_sequence(openimages):
    ds = OpenImagesBBoxValidation(size=8)
    assert ds.image_ids == ["0v01"]  # 0v02 has a single object (min_objects_per_image 2)
    ex = ds[0]
    tokens = ex["coordinates_bbox"]
    assert tokens.dtype == torch.long and tokens.shape == (92,) and ex["image"].shape == (8, 8, 3)
    # the centre crop of a 20 x 10 image is x in [0.25, 0.75]: the cat (x <= 0.2) is dropped, the dog kept.
    # dog: class 1 + 3 classes x 1 (group) = 4; corners on the 90 x 90 grid (89 steps):
    # (0.3, 0.2) -> 18 * 90 + 27 = 1647, (0.5, 0.6) -> 53 * 90 + 44 = 4814
    assert tokens[:3].tolist() == [4, 1647, 4814]
    assert tokens[3:90].tolist() == [8191] * 87
    assert tokens[90:].tolist() == [22, 89 * 90 + 67]  # the crop (0.25, 0, 0.5, 1)
    assert not ex["flipped"] and torch.allclose(ex["crop_bbox"], torch.tensor([0.25, 0.0, 0.5, 1.0]))


def test_training_flips_mirror_boxes_and_crop(openimages):
    ds = OpenImagesBBoxTrain(size=8, random_crop=False)
    torch.manual_seed(0)
    seen = {}
    for _ in range(12):
        ex = ds[0]
        seen[ex["flipped"]] = ex
    assert set(seen) == {True, False}
    kept = seen[True]["coordinates_bbox"]
    # mirrored dog: x in [0.5, 0.7] -> (44, 18) and (62, 53); the centred crop is its own mirror image
    assert kept[:3].tolist() == [4, 18 * 90 + 44, 53 * 90 + 62] and kept[90:].tolist() == [22, 8077]
    np.testing.assert_allclose(seen[True]["image"], seen[False]["image"][:, ::-1], atol=1e-6)


def test_allow_list_numbering_and_token_budget(openimages):
    ds = OpenImagesBBoxValidation(size=8, category_allow_list=["/m/car", "/m/dog", "/m/cat"],
                                  use_additional_parameters=False)
    assert ds[0]["coordinates_bbox"][0].item() == 1 + 3 * 1  # dog is class 1 of the allow list, group flag
    allow = openimages / "allow.txt"
    allow.write_text("/m/dog\n/m/cat\n")
    assert OpenImagesBBoxValidation(size=8, category_allow_list=str(allow))[0]["coordinates_bbox"][0].item() == 0 + 2
    with pytest.raises(ValueError, match="3 classes x 16 flag combinations do not fit in 15 tokens"):
        BoundingBoxTokens(3, no_tokens=16)


def test_missing_layout_is_one_line_naming_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_OPENIMAGES_ROOT", str(tmp_path / "oi"))
    for cls in (FullOpenImagesTrain, OpenImagesBBoxValidation):
        with pytest.raises(FileNotFoundError) as info:
            cls(size=8)
        message = str(info.value)
        assert str(tmp_path / "oi") in message and "Open Images V6 layout" in message and "\n" not in message
    (tmp_path / "oi" / "validation").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="class-descriptions-boxable.csv not found"):
        OpenImagesBBoxValidation(size=8)
