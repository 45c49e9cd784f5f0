"""WebDataModuleFromConfig on tiny tar shards the tests write: the img2dataset layout, the deterministic order split
by rank x worker, resume from a loader state, corrupt samples and shards, metadata filters, transforms and AddMask."""
import io
import logging
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

HELPERS = Path(__file__).resolve().parents[1] / "reliability"
sys.path.insert(0, str(HELPERS))
from run_helpers import fixture_image, fixture_samples, write_fixture_shards  # noqa: E402

from ldm.data.laion import AddMask, SampleFilter, WebDataModuleFromConfig  # noqa: E402
from ldm.data.shard_writer import write_shard, write_shards  # noqa: E402
from ldm.util import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_fixture_shards(root, shards=8, per_shard=6)
    return root


def module(root, train=None, **params):
    params.setdefault("num_workers", 0)
    train = {"shards": "{00000..00007}.tar", "shuffle": 4, **(train or {})}
    return WebDataModuleFromConfig(tar_base=str(root), batch_size=params.pop("batch_size", 2), train=train, **params)


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def keys_of(batches):
    return [k for batch in batches for k in batch["__key__"]]


def test_batches_follow_the_img2dataset_layout(shards):
    data = module(shards, train={"rename": {"jpg": "image", "txt": "caption"}})
    (batch,) = take(data.make_loader("train"), 1)
    assert batch["jpg"].shape == (2, 8, 8, 3) and batch["jpg"].dtype == torch.float32
    assert -1.0 <= batch["jpg"].min() and batch["jpg"].max() <= 1.0
    assert batch["image"] is batch["jpg"] and batch["caption"] == batch["txt"]
    for key, caption, meta in zip(batch["__key__"], batch["txt"], batch["json"]):
        assert caption == f"caption {int(key)}" and meta["key"] == key
    # png, jpg and webp members all decode, under the batch key `jpg`; png pixels are exact
    index = int(batch["__key__"][0])
    expected = np.asarray(__import__("PIL.Image").Image.open(io.BytesIO(fixture_image(index))), dtype=np.float32)
    if index % 3 == 0:
        np.testing.assert_allclose(batch["jpg"][0].numpy(), expected / 127.5 - 1.0, atol=1e-6)


def test_brace_lists_local_paths_and_pipe_commands_give_the_same_samples(shards):
    as_list = module(None, train={"shards": [str(shards / f"{i:05d}.tar") for i in range(8)], "shuffle": 0})
    as_pipe = module(None, train={"shards": f"pipe:cat {shards}/{{00000..00007}}.tar", "shuffle": 0})
    as_brace = module(shards, train={"shuffle": 0})
    expected = keys_of(take(as_brace.make_loader("train"), 24))
    assert sorted(expected) == [f"{i:09d}" for i in range(48)]
    assert keys_of(take(as_list.make_loader("train"), 24)) == expected
    assert keys_of(take(as_pipe.make_loader("train"), 24)) == expected


@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_once_per_epoch_across_ranks_and_workers(shards, workers):
    """2 ranks x `workers` workers: each data epoch covers all 48 samples exactly once, in a new order each epoch."""
    seen = {0: [], 1: []}
    for rank in (0, 1):
        loader = module(shards, num_workers=workers).make_loader("train", topology=(rank, 2))
        assert len(loader) == 48 // (2 * 2)
        for batch in take(loader, 36):  # 3 epochs' worth of this rank's batches
            for key, epoch in zip(batch["__key__"], batch["__epoch__"].tolist()):
                seen.setdefault(epoch, []).append((rank, key))
    for epoch in (0, 1):
        keys = [key for _, key in seen[epoch]]
        assert Counter(keys) == Counter(f"{i:09d}" for i in range(48)), epoch
        ranks = {rank: {key for r, key in seen[epoch] if r == rank} for rank in (0, 1)}
        assert not ranks[0] & ranks[1]
    assert [k for _, k in seen[0]] != [k for _, k in seen[1]]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_state_resumes_the_exact_batches(shards, workers):
    data = module(shards, num_workers=workers)
    loader = data.make_loader("train")
    it = iter(loader)
    for _ in range(17):  # mid-epoch, mid shuffle window
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(12)]  # crosses into the next data epoch
    resumed = module(shards, num_workers=workers).make_loader("train")
    resumed.load_state_dict(state)
    got = take(resumed, 12)
    assert keys_of(got) == keys_of(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a["jpg"], b["jpg"])


def test_a_state_from_another_order_starts_the_next_epoch_with_a_warning(shards, caplog):
    loader = module(shards, num_workers=0).make_loader("train")
    take(loader, 5)
    state = loader.state_dict()
    other = module(shards, num_workers=2).make_loader("train")
    with caplog.at_level(logging.WARNING):
        other.load_state_dict(state)
    assert "other streams" in caplog.text
    assert set(b.item() for b in take(other, 1)[0]["__epoch__"]) == {1}


def _write_raw_shard(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_samples_and_unreadable_shards_are_skipped_counted_and_named(tmp_path, caplog):
    good = list(fixture_samples(8))
    write_shard(tmp_path / "00000.tar", good[:4])
    _write_raw_shard(tmp_path / "00001.tar", [
        ("000000100.png", b"not an image"), ("000000100.txt", b"broken"),
        ("000000101.png", fixture_image(101)),  # no caption
        ("000000102.png", fixture_image(102)), ("000000102.txt", b"fine"), ("000000102.json", b"{nope"),
        ("000000103.png", fixture_image(103)), ("000000103.txt", b"caption 103")])
    whole = tmp_path / "whole.tar"
    write_shard(whole, good[4:])
    (tmp_path / "00002.tar").write_bytes(whole.read_bytes()[:3000])  # truncated inside the third sample
    (tmp_path / "00003.tar").write_bytes(b"garbage" * 100)
    shards = [str(tmp_path / f"{i:05d}.tar") for i in range(4)] + [str(tmp_path / "missing.tar"), "pipe:false"]
    data = WebDataModuleFromConfig(tar_base=None, batch_size=1, num_workers=0,
                                   train={"shards": shards, "shuffle": 0, "epoch_length": 100})
    loader = data.make_loader("train")
    with caplog.at_level(logging.WARNING):
        keys = keys_of(take(loader, 3 * 6))  # 3 data epochs of 4 + 1 + 1 good samples
    assert Counter(keys)["000000103"] == 3 and Counter(keys)["000000004"] == 3 and len(set(keys)) == 6
    report = loader.report
    assert report.bad_per_shard == {shards[1]: 3 * 3}
    assert {(key, reason.split(" ")[0]) for _, key, reason in report.bad_samples} == {
        ("000000100", "cannot"), ("000000101", "no"), ("000000102", "unreadable")}
    assert set(report.bad_shards) == {shards[2], shards[3], shards[4], "pipe:false"}
    assert "truncated" in report.bad_shards[shards[2]] and "opened" in report.bad_shards[shards[4]]
    assert "skipped sample 000000100 of shard " + shards[1] in caplog.text
    for url in report.bad_shards:  # reported once, although each epoch meets it again
        assert caplog.text.count(f"shard {url} ") == 1, url


def test_metadata_filters_and_parquet_columns(tmp_path):
    samples = []
    for i, meta in enumerate([{}, {"original_width": 4, "original_height": 16}, {"pwatermark": 0.9},
                              {"width": 64, "height": 8}, {}, {}]):
        samples.append({"__key__": f"{i:09d}", "png": fixture_image(i), "txt": "a nude cat" if i == 4 else "a cat",
                        "json": meta})
    write_shard(tmp_path / "00000.tar", samples, parquet=False)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"key": f"{i:09d}", "punsafe": 0.5 if i == 5 else 0.0} for i in range(6)]),
                   tmp_path / "00000.parquet")
    words = tmp_path / "filters.yaml"
    words.write_text("nsfw: [nude, naked]\n")
    data = WebDataModuleFromConfig(tar_base=str(tmp_path), batch_size=1, num_workers=0, min_size=6,
                                   max_pwatermark=0.5, p_unsafe_threshold=0.1, filter_word_list=str(words),
                                   max_aspect_ratio=2.0, train={"shards": "00000.tar", "repeat": False})
    loader = data.make_loader("train")
    assert keys_of(list(loader)) == ["000000000"]
    assert dict(loader.report.filtered) == {"min_size": 1, "pwatermark": 1, "max_aspect_ratio": 1,
                                            "filter_word_list": 1, "punsafe": 1}
    assert loader.report.num_bad_samples == 0
    assert SampleFilter(min_size=10).check_size({}, (12, 12)) is None  # the decoded size when metadata has none


def test_sd_transforms_are_seeded_per_sample_and_epoch(shards):
    transforms = [{"target": "torchvision.transforms.Resize", "params": {"size": 12, "interpolation": 3}},
                  {"target": "torchvision.transforms.RandomCrop", "params": {"size": 6}}]
    first = take(module(shards, train={"image_transforms": transforms}).make_loader("train"), 30)
    again = take(module(shards, train={"image_transforms": transforms}, num_workers=2).make_loader("train"), 30)
    torch.manual_seed(123)  # the global generator plays no part
    crops = {}
    for batch in first:
        for key, epoch, image in zip(batch["__key__"], batch["__epoch__"].tolist(), batch["jpg"]):
            crops[(key, epoch)] = image
    assert first[0]["jpg"].shape == (2, 6, 6, 3)
    same = [torch.equal(crops[(k, e)], image) for batch in again
            for k, e, image in zip(batch["__key__"], batch["__epoch__"].tolist(), batch["jpg"]) if (k, e) in crops]
    assert len(same) > 10 and all(same)  # another worker layout, another order: the same crop per sample
    by_key = {}
    for (key, epoch), image in crops.items():
        by_key.setdefault(key, {})[epoch] = image
    assert any(not torch.equal(v[0], v[1]) for v in by_key.values() if len(v) == 2)  # a new crop next epoch


def test_add_mask_for_inpainting(shards):
    post = {"target": "ldm.data.laion.AddMask", "params": {"mode": "512train-large", "p_drop": 0.0}}
    batches = take(module(shards, train={"postprocess": post}).make_loader("train"), 3)
    for batch in batches:
        mask, image, masked = batch["mask"], batch["jpg"], batch["masked_image"]
        assert mask.shape == (2, 8, 8, 1) and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(masked, image * (mask < 0.5))
    again = take(module(shards, train={"postprocess": post}).make_loader("train"), 3)
    assert all(torch.equal(a["mask"], b["mask"]) for a, b in zip(batches, again))
    full = AddMask(p_drop=1.0)({"jpg": torch.zeros(4, 4, 3)}, rng=np.random.default_rng(0))
    assert full["mask"].min() == 1.0
    with pytest.raises(ValueError, match="unknown mask generation mode 'huge'"):
        AddMask(mode="huge")


def test_the_sd_inpainting_config_data_section_reads_local_shards(shards, tmp_path):
    config = OmegaConf.load(REPO / "configs" / "stable-diffusion" / "v2-inpainting-inference.yaml").data
    words = tmp_path / "filters.yaml"
    words.write_text("- forbidden\n")
    for split in ("train", "validation"):
        config.params[split].shards = f"{shards}/{{00000..00007}}.tar"
        for transform in config.params[split].image_transforms:
            transform.params.size = 8
    config.params.update(filter_word_list=str(words), min_size=8, num_workers=0, batch_size=2)
    from ldm.util import instantiate_from_config

    data = instantiate_from_config(config)
    train = next(iter(data.train_dataloader()))
    assert train["jpg"].shape == (2, 8, 8, 3) and train["mask"].shape == (2, 8, 8, 1) and len(train["txt"]) == 2
    val = list(data.val_dataloader())
    assert sorted(keys_of(val)) == [f"{i:09d}" for i in range(48)]  # one pass, in order, every sample


@pytest.mark.parametrize("params, message", [
    ({"train": {"shards": "x.tar", "transforms": {}}}, r"data.params.train: unknown key\(s\) transforms"),
    ({"train": {"shuffle": 3}}, "expected a mapping with 'shards'"),
    ({"train": {"shards": []}}, "data.params.train.shards: no shards given"),
    ({"filter_word_list": "data/filters.yaml", "train": {"shards": "x.tar"}}, "word list 'data/filters.yaml' does not"),
])
def test_config_mistakes_name_the_key(params, message):
    with pytest.raises(ConfigError, match=message):
        WebDataModuleFromConfig(tar_base=None, batch_size=2, **params).make_loader("train")


def test_too_few_shards_for_the_readers_and_single_node_only(shards):
    loader = module(shards, train={"shards": "{00000..00002}.tar"}, num_workers=2).make_loader("train",
                                                                                              topology=(0, 2))
    with pytest.raises(ValueError, match=r"3 shard\(s\) cannot feed 4 readers"):
        next(iter(loader))
    with pytest.raises(ValueError, match="multinode is false"):
        module(shards, multinode=False).make_loader("train", topology=(0, 2))


def test_write_shards_layout(tmp_path):
    paths = write_shards(fixture_samples(5), tmp_path, samples_per_shard=2, parquet=True)
    assert [Path(p).name for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(paths[0]) as tar:
        assert tar.getnames() == ["000000000.png", "000000000.txt", "000000000.json",
                                  "000000001.jpg", "000000001.txt", "000000001.json"]
    assert (tmp_path / "00002_stats.json").is_file() and (tmp_path / "00002.parquet").is_file()
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_the_built_in_shapes_ldm_trains_from_shards_through_main(tmp_path):
    from run_helpers import run_main

    from ldm.data.shapes import ShapesTrain

    dataset = ShapesTrain(size=16, length=32)

    def samples():
        for index in range(32):
            example = dataset[index]
            pixels = ((example["image"] + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            __import__("PIL.Image").Image.fromarray(pixels).save(buffer, format="PNG")
            yield {"__key__": f"{index:09d}", "png": buffer.getvalue(), "txt": example["caption"]}

    write_shards(samples(), tmp_path / "shards", 8)
    data = {"target": "ldm.data.laion.WebDataModuleFromConfig",
            "params": {"tar_base": str(tmp_path / "shards"), "batch_size": 4, "num_workers": 0,
                       "train": {"shards": "{00000..00003}.tar", "shuffle": 8, "rename": {"jpg": "image",
                                                                                        "txt": "caption"}}}}
    config = OmegaConf.load(REPO / "configs" / "latent-diffusion" / "shapes-ldm-kl-4.yaml")
    config.data = data  # the config's own model and lightning sections, its data from shards
    config.model.params.cond_stage_config.params.tokenizer_path = str(REPO / config.model.params.cond_stage_config
                                                                      .params.tokenizer_path)
    config.lightning.callbacks.image_logger = None
    config.lightning.trainer.update(max_time=None, enable_progress_bar=False)
    del config.lightning.trainer["val_check_interval"]  # no validation split here
    OmegaConf.save(config, tmp_path / "shapes-shards.yaml")
    proc = run_main(tmp_path, "-b", "shapes-shards.yaml", "-t", "--no-test", "--max_steps", "3")
    assert proc.returncode == 0, proc.output[-3000:]
    assert "train data: 4 shards, 8 batches of 4 per process per epoch" in proc.output
    (run,) = (tmp_path / "logs").iterdir()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
