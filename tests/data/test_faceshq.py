"""CelebA-HQ / FFHQ readers on tiny fixtures in the original layout: .npy and image files, sizes, keys, errors."""
import numpy as np
import pytest
from PIL import Image

from ldm.data.faceshq import CelebAHQTrain, CelebAHQValidation, FFHQTrain, FFHQValidation


@pytest.fixture()
def faces(tmp_path, monkeypatch):
    """data/celebahq/*.npy (1, 3, H, W) uint8 and data/ffhq/*.png with their lists, under the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LDM_FACESHQ_ROOT", raising=False)
    rng = np.random.default_rng(0)
    (tmp_path / "data" / "celebahq").mkdir(parents=True)
    (tmp_path / "data" / "ffhq" / "00000").mkdir(parents=True)
    arrays = {}
    for i in range(3):
        arrays[i] = rng.integers(0, 256, size=(1, 3, 12, 12), dtype=np.uint8)
        np.save(tmp_path / "data" / "celebahq" / f"imgHQ{i:05d}.npy", arrays[i])
        Image.fromarray(rng.integers(0, 256, size=(10, 14, 3), dtype=np.uint8)).save(
            tmp_path / "data" / "ffhq" / "00000" / f"{i:05d}.png")
    (tmp_path / "data" / "celebahqtrain.txt").write_text("imgHQ00000.npy\nimgHQ00001.npy\n")
    (tmp_path / "data" / "celebahqvalidation.txt").write_text("imgHQ00002.npy\n")
    (tmp_path / "data" / "ffhqtrain.txt").write_text("00000/00000.png\n00000/00001.png\n")
    (tmp_path / "data" / "ffhqvalidation.txt").write_text("00000/00002.png\n")
    return tmp_path, arrays


def test_celebahq_reads_the_npy_arrays(faces):
    root, arrays = faces
    train, val = CelebAHQTrain(size=None), CelebAHQValidation(size=None)
    assert len(train) == 2 and len(val) == 1
    ex = val[0]
    expected = arrays[2][0].transpose(1, 2, 0).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(ex["image"], expected, atol=1e-6)
    assert ex["file_path_"].endswith("celebahq/imgHQ00002.npy")
    assert CelebAHQTrain(size=8)[0]["image"].shape == (8, 8, 3)


def test_ffhq_resizes_the_shorter_side_and_centre_crops(faces):
    root, _ = faces
    ex = FFHQValidation(size=10)[0]  # 14 x 10 image: no resize, centre 10 x 10 crop
    source = np.asarray(Image.open(root / "data/ffhq/00000/00002.png"), np.float32) / 127.5 - 1
    np.testing.assert_allclose(ex["image"], source[:, 2:12], atol=1e-6)
    train = FFHQTrain(size=6, keys=["image"])
    assert len(train) == 2 and set(train[1]) == {"image"} and train[1]["image"].shape == (6, 6, 3)
    assert train[1]["image"].dtype == np.float32 and -1 <= train[1]["image"].min() <= train[1]["image"].max() <= 1


def test_data_root_and_one_line_errors(faces, tmp_path, monkeypatch):
    root, _ = faces
    monkeypatch.chdir(tmp_path / "data")  # the relative default data/ is gone from here
    with pytest.raises(FileNotFoundError) as info:
        FFHQTrain(size=8)
    message = str(info.value)
    assert "FFHQTrain: folder data/ffhq not found" in message and "ffhqtrain.txt" in message and "\n" not in message
    monkeypatch.setenv("LDM_FACESHQ_ROOT", str(root / "data"))
    assert len(FFHQTrain(size=8)) == 2
    (root / "data" / "celebahqtrain.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"CelebAHQTrain: file list .*celebahqtrain.txt not found"):
        CelebAHQTrain(size=8, data_root=str(root / "data"))
