"""scripts/make_shards.py: an image folder with captions becomes shards that WebDataModuleFromConfig reads back."""
import importlib.util
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.data.laion import WebDataModuleFromConfig

REPO = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("make_shards", REPO / "scripts" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def image_folder(root, sizes):
    root.mkdir()
    rng = np.random.default_rng(0)
    for i, (size, ext) in enumerate(sizes):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i}.{ext}")
    return root


def read_back(out, batch_size=1):
    data = WebDataModuleFromConfig(tar_base=str(out), batch_size=batch_size, num_workers=0,
                                   train={"shards": sorted(p.name for p in out.glob("*.tar")), "repeat": False,
                                          "size": 8})
    return [s for batch in data.make_loader("train") for s in zip(batch["__key__"], batch["txt"], batch["json"])]


def test_side_txt_captions_keep_bytes_and_skip_unreadable_files(tmp_path, capsys):
    root = image_folder(tmp_path / "imgs", [((8, 8), "png"), ((12, 8), "jpg"), ((8, 10), "bmp")])
    (root / "img0.txt").write_text("a red square\n")
    (root / "broken.png").write_bytes(b"nope")
    out = tmp_path / "shards"
    assert load_script().main(["--images", str(root), "--out", str(out), "--samples-per-shard", "2"]) == 0
    printed = capsys.readouterr().out
    assert "3 images -> 2 shard(s)" in printed and "{00000..00001}.tar" in printed
    with tarfile.open(out / "00000.tar") as tar:
        names = tar.getnames()
        assert names[:3] == ["000000000.png", "000000000.txt", "000000000.json"]
        assert tar.extractfile("000000000.png").read() == (root / "img0.png").read_bytes()  # the file's bytes
        assert "000000001.jpg" in names
    with tarfile.open(out / "00001.tar") as tar:
        assert tar.getnames()[0] == "000010000.png"  # the bmp, re-encoded; keys count per shard
    samples = read_back(out)
    assert [(k, c) for k, c, _ in samples] == [("000000000", "a red square"), ("000000001", ""), ("000010000", "")]
    assert samples[1][2]["original_width"] == 12 and samples[1][2]["file_name"] == "img1.jpg"


def test_captions_file_resize_and_parquet(tmp_path):
    root = image_folder(tmp_path / "imgs", [((32, 16), "png"), ((16, 16), "webp")])
    captions = tmp_path / "caps.jsonl"
    captions.write_text(json.dumps({"file_name": "img0.png", "text": "wide"}) + "\n" +
                        json.dumps({"file_name": "img1.webp", "text": "square"}) + "\n")
    out = tmp_path / "shards"
    assert load_script().main(["--images", str(root), "--captions", str(captions), "--out", str(out),
                               "--resize", "8", "--format", "jpg", "--parquet"]) == 0
    samples = read_back(out)
    assert [c for _, c, _ in samples] == ["wide", "square"]
    assert samples[0][2]["width"] == 16 and samples[0][2]["height"] == 8 and samples[0][2]["original_width"] == 32
    import pyarrow.parquet as pq

    assert pq.read_table(out / "00000.parquet").column("key").to_pylist() == ["000000000", "000000001"]


def test_user_mistakes_are_one_line(tmp_path, capsys):
    script = load_script()
    assert script.main(["--images", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --images: '{tmp_path / 'none'}' is not a folder"
    root = image_folder(tmp_path / "imgs", [((8, 8), "png")])
    assert script.main(["--images", str(root), "--captions", str(tmp_path / "c.txt"), "--out", "o"]) == 2
    assert "--captions" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
