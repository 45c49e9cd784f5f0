"""ImageNet and LSUN readers on tiny fake trees: labels, sizes, the published configs, missing-data errors."""
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.imagenet import ImageNetSR, ImageNetTrain, ImageNetValidation
from ldm.data.lsun import LSUNBedroomsValidation, LSUNChurchesTrain, LSUNChurchesValidation
from ldm.util import instantiate_from_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "latent-diffusion"
SYNSETS = ["n01440764", "n01443537", "n02102040"]


def _image(path, size=(8, 8), value=0, fmt=None):
    rng = np.random.default_rng(value)
    array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).save(path, format=fmt)
    return array


@pytest.fixture()
def imagenet_root(tmp_path):
    """root/train/<synset>/*.JPEG|png and root/val/<synset>/..., plus a synset → name file."""
    for split, per_class in (("train", 3), ("val", 1)):
        for k, synset in enumerate(SYNSETS):
            folder = tmp_path / split / synset
            folder.mkdir(parents=True)
            for j in range(per_class):
                ext = ".JPEG" if j % 2 == 0 else ".png"
                _image(folder / f"{synset}_{j}{ext}", size=(12, 8), value=10 * k + j, fmt="JPEG" if ext == ".JPEG" else "PNG")
    (tmp_path / "synset_human.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn02102040 English springer\n"
    )
    return tmp_path


def test_imagenet_labels_sizes_and_names(imagenet_root):
    train = ImageNetTrain(config={"size": 8, "root": str(imagenet_root)})
    val = ImageNetValidation(config={"size": 6, "root": str(imagenet_root)})
    assert len(train) == 9 and len(val) == 3
    for ds, size in ((train, 8), (val, 6)):
        for i in range(len(ds)):
            ex = ds[i]
            assert ex["image"].shape == (size, size, 3) and ex["image"].dtype == np.float32
            assert -1.0 <= ex["image"].min() and ex["image"].max() <= 1.0
            assert ex["class_label"] == SYNSETS.index(ex["synset"]) and ex["synsets"] == ex["synset"]
            assert ex["relpath"].startswith(ex["synset"] + "/")
    assert train[0]["human_label"] == "tench, Tinca tinca"
    assert val.random_crop is False and train.random_crop is True
    legacy = ImageNetTrain(config={"root": str(imagenet_root), "ImageNetTrain": {"random_crop": False}})
    assert legacy.random_crop is False and legacy[0]["image"].shape == (8, 12, 3)  # no size: the full image


def test_imagenet_centre_crop_of_a_wide_image(imagenet_root):
    val = ImageNetValidation(config={"size": 8, "root": str(imagenet_root)})
    ex = val[0]
    original = np.asarray(Image.open(ex["file_path_"]).convert("RGB"), dtype=np.float32) / 127.5 - 1
    np.testing.assert_allclose(ex["image"], original[:, 2:10], atol=1e-6)  # 12×8 → centre 8×8, no resize


def test_imagenet_env_root_sub_indices_and_published_config(imagenet_root, monkeypatch):
    monkeypatch.setenv("LDM_IMAGENET_ROOT", str(imagenet_root))
    # sub_indices are ImageNet class indices (data/index_synset.yaml): 1 = n01443537, 217 = n02102040; the labels
    # count the kept synsets, as the original
    sub = ImageNetTrain(config={"size": 8, "sub_indices": "1,200-217"})
    assert set(sub.synsets) == set(SYNSETS[1:]) and set(sub.class_labels) == {0, 1}
    published = OmegaConf.load(CONFIGS / "cin-ldm-vq-f8.yaml").data.params
    for part in ("train", "validation"):
        ds = instantiate_from_config(published[part])
        assert ds.size == 256 and ds[0]["image"].shape == (256, 256, 3)


def test_imagenet_class_index_is_shipped_and_gives_the_original_labels(imagenet_root, tmp_path):
    from ldm.data.imagenet import SHIPPED_INDEX, read_synset_index, synset2idx

    index = read_synset_index()
    assert SHIPPED_INDEX.relative_to(Path(__file__).resolve().parents[2]).as_posix() == "data/index_synset.yaml"
    assert len(index) == 1000 and index[0] == "n01440764" and index[999] == "n15075141"
    # the original's file verbatim, quirks included: n03126707 stands at 134 and 517, so 999 distinct synsets
    assert len(set(index.values())) == 999 and index[134] == index[517] == "n03126707"
    train = ImageNetTrain(config={"size": 8, "root": str(imagenet_root), "keep_orig_class_label": True})
    assert {synset: label for synset, label in zip(train.synsets, train.class_labels)} == {
        "n01440764": 0, "n01443537": 1, "n02102040": 217}
    assert synset2idx()["n02102040"] == 217
    # an index_synset.yaml beside the data (where the original downloaded it) is preferred
    (imagenet_root / "index_synset.yaml").write_text("5: n01440764\n6: n01443537\n7: n02102040\n")
    relabelled = ImageNetValidation(config={"root": str(imagenet_root), "keep_orig_class_label": True})
    assert sorted(set(relabelled.class_labels)) == [5, 6, 7]
    with pytest.raises(FileNotFoundError, match=r"none of the classes sub_indices=\[3\] has images in .*val"):
        ImageNetValidation(config={"root": str(imagenet_root), "sub_indices": [3]})
    with pytest.raises(FileNotFoundError, match="ImageNet class index .*nope.yaml not found"):
        read_synset_index(tmp_path / "nope.yaml")


def test_imagenet_missing_data_names_the_path(tmp_path, monkeypatch):
    monkeypatch.delenv("LDM_IMAGENET_ROOT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as info:
        ImageNetTrain(config={"size": 8})
    message = str(info.value)
    assert str(tmp_path / "cache" / "autoencoders" / "data" / "ILSVRC2012_train" / "data") in message
    assert "\n" not in message and "LDM_IMAGENET_ROOT" in message
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "elsewhere")):
        ImageNetValidation(config={"root": str(tmp_path / "elsewhere")})


def test_imagenet_sr_pairs_and_degradations(imagenet_root):
    config = {"root": str(imagenet_root)}
    ds = ImageNetSR(size=8, degradation="pil_bicubic", downscale_f=4, config=config)
    ex = ds[0]
    assert ex["image"].shape == (8, 8, 3) and ex["LR_image"].shape == (2, 2, 3)
    nearest = ImageNetSR(size=8, degradation="cv_nearest", downscale_f=2, min_crop_f=1.0, random_crop=False, config=config)
    ex = nearest[0]
    np.testing.assert_allclose(ex["LR_image"], ex["image"][::2, ::2], atol=1e-6)  # nearest = subsampling
    with pytest.raises(ValueError, match="degradation='cv_sharpen' is not known"):
        ImageNetSR(size=8, degradation="cv_sharpen", config=config)
    with pytest.raises(ValueError, match="divisible"):
        ImageNetSR(size=10, degradation="pil_nearest", downscale_f=4, config=config)


@pytest.mark.parametrize("degradation", ["bsrgan", "bsrgan_light"])
def test_imagenet_sr_bsrgan_degradations(imagenet_root, degradation):
    import random

    config = {"root": str(imagenet_root)}
    ds = ImageNetSR(size=8, degradation=degradation, downscale_f=4, min_crop_f=1.0, random_crop=False, config=config)
    random.seed(0)
    first = ds[1]
    assert first["image"].shape == (8, 8, 3) and first["LR_image"].shape == (2, 2, 3)
    assert first["LR_image"].dtype == np.float32 and -1.0 <= first["LR_image"].min() <= first["LR_image"].max() <= 1.0
    random.seed(0)
    np.testing.assert_array_equal(ds[1]["LR_image"], first["LR_image"])  # the global `random` seeds it


@pytest.fixture()
def lsun_root(tmp_path):
    """data/lsun/churches/<images> with the train/val lists, as the original layout."""
    images = tmp_path / "churches"
    (images / "sub").mkdir(parents=True)
    names = []
    for i in range(4):
        name = f"sub/church_{i}.png" if i % 2 else f"church_{i}.jpg"
        _image(images / name, size=(10, 6), value=i)
        names.append(name)
    (tmp_path / "church_outdoor_train.txt").write_text("\n".join(names[:3]) + "\n")
    (tmp_path / "church_outdoor_val.txt").write_text(names[3] + "\n")
    return tmp_path


def test_lsun_sizes_flip_and_published_config(lsun_root, monkeypatch):
    monkeypatch.setenv("LDM_LSUN_ROOT", str(lsun_root))
    train = LSUNChurchesTrain(size=4, flip_p=1.0)
    val = LSUNChurchesValidation(size=6)
    assert len(train) == 3 and len(val) == 1 and val.flip_p == 0.0
    ex = val[0]
    assert ex["image"].shape == (6, 6, 3) and ex["relative_file_path_"] == "sub/church_3.png"
    source = Image.open(ex["file_path_"]).convert("RGB").crop((2, 0, 8, 6))
    np.testing.assert_allclose(ex["image"], np.asarray(source, np.float32) / 127.5 - 1, atol=1e-6)
    flipped = LSUNChurchesTrain(size=None, flip_p=1.0)[0]["image"]
    unflipped = LSUNChurchesTrain(size=None, flip_p=0.0)[0]["image"]
    np.testing.assert_array_equal(flipped, unflipped[:, ::-1])
    published = OmegaConf.load(CONFIGS / "lsun_churches-ldm-kl-8.yaml").data.params
    ds = instantiate_from_config(published.train)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 256, 256, 3)


def test_lsun_missing_list_names_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LDM_LSUN_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match="data/lsun/bedrooms_val.txt"):
        LSUNBedroomsValidation(size=8)
