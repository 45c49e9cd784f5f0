"""ImageFolderDataset: captions from side files and metadata.jsonl, sub-folder classes, broken files, crop/flip."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.imagefolder import ImageFolderDataset, ImageFolderTrain, ImageFolderValidation


def _save(path, size=(8, 8), seed=0, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = 4 if mode == "RGBA" else 3
    array = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(array, mode).save(path)
    return array


@pytest.fixture()
def folder(tmp_path):
    """cats/ and dogs/ sub-folders, .txt side captions for cats, metadata.jsonl for dogs."""
    _save(tmp_path / "cats" / "a.png", seed=1)
    (tmp_path / "cats" / "a.txt").write_text("a tabby cat\n")
    _save(tmp_path / "cats" / "deep" / "b.jpg", seed=2)
    (tmp_path / "cats" / "deep" / "b.txt").write_text("a sleeping cat")
    _save(tmp_path / "dogs" / "c.png", seed=3)
    _save(tmp_path / "dogs" / "d.webp", seed=4)
    lines = [{"file_name": "c.png", "text": "a dog in snow"}, {"file_name": "d.webp", "text": "a puppy"}]
    (tmp_path / "dogs" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    (tmp_path / "dogs" / "notes.md").write_text("not an image")
    return tmp_path


def test_captions_classes_and_format(folder):
    ds = ImageFolderDataset(str(folder), size=8)
    examples = {ds[i]["relpath"]: ds[i] for i in range(len(ds))}
    assert set(examples) == {"cats/a.png", "cats/deep/b.jpg", "dogs/c.png", "dogs/d.webp"}
    assert examples["cats/a.png"]["caption"] == "a tabby cat"
    assert examples["cats/deep/b.jpg"]["caption"] == "a sleeping cat"
    assert examples["dogs/c.png"]["caption"] == "a dog in snow"
    assert examples["dogs/d.webp"]["caption"] == "a puppy"
    assert ds.class_names == ["cats", "dogs"]
    for ex in examples.values():
        assert ex["class_label"] == ds.class_names.index(ex["class_name"]) == ["cats", "dogs"].index(ex["relpath"].split("/")[0])
        assert ex["image"].shape == (8, 8, 3) and ex["image"].dtype == np.float32
        assert -1.0 <= ex["image"].min() and ex["image"].max() <= 1.0
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 8, 8, 3) and len(batch["caption"]) == 4


def test_caption_sources(folder):
    only_txt = ImageFolderDataset(str(folder), size=8, caption_source="txt")
    assert {only_txt[i]["caption"] for i in range(4)} == {"a tabby cat", "a sleeping cat", ""}
    names = ImageFolderDataset(str(folder), size=8, caption_source="filename")
    assert {names[i]["caption"] for i in range(4)} == {"a", "b", "c", "d"}
    with pytest.raises(ValueError, match="caption_source"):
        ImageFolderDataset(str(folder), caption_source="exif")


def test_centre_crop_resize_and_flip(tmp_path):
    original = _save(tmp_path / "wide.png", size=(16, 8))
    centre = ImageFolderDataset(str(tmp_path), size=8)[0]["image"]
    np.testing.assert_allclose(centre, original[:, 4:12] / 127.5 - 1, atol=1e-6)  # shorter side already 8
    flipped = ImageFolderDataset(str(tmp_path), size=8, flip_p=1.0)[0]["image"]
    np.testing.assert_array_equal(flipped, centre[:, ::-1])
    torch.manual_seed(0)
    crops = {ImageFolderDataset(str(tmp_path), size=8, random_crop=True)[0]["image"].tobytes() for _ in range(20)}
    assert len(crops) > 1
    small = ImageFolderDataset(str(tmp_path), size=4)[0]["image"]
    assert small.shape == (4, 4, 3)


def test_transparency_is_composited_on_the_background(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    ex = ImageFolderDataset(str(tmp_path), size=8, background="black")[0]
    np.testing.assert_array_equal(ex["image"], -1.0)


def test_unreadable_file_skipped_with_one_warning_naming_it(folder, caplog):
    (folder / "cats" / "broken.png").write_bytes(b"this is not a png")
    with caplog.at_level(logging.WARNING, logger="ldm.data"):
        ds = ImageFolderDataset(str(folder), size=8)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "broken.png" in warnings[0] and "1 unreadable" in warnings[0]
    assert len(ds) == 4


def test_file_failing_at_access_time_gives_the_next_good_example(tmp_path, caplog):
    _save(tmp_path / "a.png", seed=1)
    good = _save(tmp_path / "b.png", seed=2)
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])  # truncated: header fine, decoding fails
    ds = ImageFolderDataset(str(tmp_path), size=8)
    assert len(ds) == 2
    with caplog.at_level(logging.WARNING, logger="ldm.data"):
        ex = ds[0]
        ds[0]
    assert ex["relpath"] == "b.png"
    np.testing.assert_allclose(ex["image"], good / 127.5 - 1, atol=1e-6)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "a.png" in warnings[0]


def test_missing_or_empty_root_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ImageFolderDataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        ImageFolderDataset(str(tmp_path / "empty"))


def test_train_validation_split_is_disjoint_and_complete(tmp_path):
    for i in range(20):
        _save(tmp_path / f"img_{i:02d}.png", seed=i)
    train = ImageFolderTrain(str(tmp_path), size=8, val_fraction=0.25, seed=3)
    val = ImageFolderValidation(str(tmp_path), size=8, val_fraction=0.25, seed=3)
    assert len(val) == 5 and len(train) == 15
    assert not set(train.files) & set(val.files) and set(train.files) | set(val.files) == set(sorted(tmp_path.glob("*.png")))
    assert train.random_crop and train.flip_p == 0.5 and not val.random_crop and val.flip_p == 0.0
