"""Real-data statistics cached on disk: reused on the second call, recomputed when the data, the extractor or the
sample count change, and when an entry is corrupt."""
import os

import numpy as np
import torch

from ldm.evaluation.fidelity import FeatureStatistics
from ldm.evaluation.stats_cache import StatsCache, dataset_fingerprint, folder_fingerprint, resize_mode


class Counting:
    def __init__(self, seed=0):
        self.calls, self.seed = 0, seed

    def __call__(self):
        self.calls += 1
        return FeatureStatistics.from_features(torch.rand(6, 16, generator=torch.Generator().manual_seed(self.seed)))


def test_statistics_are_reused_then_invalidated_by_data_and_extractor(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    files = []
    for i in range(3):
        files.append(str(folder / f"{i}.png"))
        open(files[-1], "wb").write(bytes([i]) * 10)
    cache = StatsCache(tmp_path / "cache")
    compute = Counting()
    key = cache.key(folder_fingerprint(files), resize_mode(), "sha-a:2048", 6)
    first = cache.get(key, compute)
    second = cache.get(key, compute)
    assert compute.calls == 1
    assert torch.equal(first.features, second.features)
    assert np.array_equal(first.mu, second.mu) and first.mu.dtype == second.mu.dtype
    assert np.array_equal(first.sigma, second.sigma) and first.sigma.dtype == second.sigma.dtype

    open(files[1], "wb").write(b"rewritten image")  # the data changed
    os.utime(files[1], ns=(1, 1))
    cache.get(cache.key(folder_fingerprint(files), resize_mode(), "sha-a:2048", 6), compute)
    assert compute.calls == 2
    cache.get(cache.key(folder_fingerprint(files), resize_mode(), "sha-b:2048", 6), compute)  # other extractor
    assert compute.calls == 3
    cache.get(cache.key(folder_fingerprint(files), resize_mode(32), "sha-b:2048", 6), compute)  # other resize
    assert compute.calls == 4
    cache.get(cache.key(folder_fingerprint(files), resize_mode(32), "sha-b:2048", 6), compute)
    assert compute.calls == 4


def test_corrupt_or_foreign_entries_are_recomputed(tmp_path, caplog):
    cache = StatsCache(tmp_path)
    key = cache.key("data", resize_mode(), "sha:2048", 6)
    compute = Counting()
    cache.get(key, compute)
    cache.path(key).write_bytes(b"half a file")
    cache.get(key, compute)
    assert compute.calls == 2 and "recomputing" in caplog.text
    other = cache.key("other data", resize_mode(), "sha:2048", 6)
    os.replace(cache.path(key), cache.path(other))  # an entry whose recorded key is not the one asked for
    cache.get(other, compute)
    assert compute.calls == 3
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_dataset_fingerprint_follows_config_split_and_length():
    config = {"target": "ldm.data.shapes.ShapesValidation", "params": {"size": 16, "length": 8}}
    base = dataset_fingerprint(config, "validation", 8)
    assert base == dataset_fingerprint(dict(config), "validation", 8)
    assert base != dataset_fingerprint({**config, "params": {"size": 32, "length": 8}}, "validation", 8)
    assert base != dataset_fingerprint(config, "train", 8)
    assert base != dataset_fingerprint(config, "validation", 9)


def test_disabled_cache_computes_every_time(tmp_path):
    cache = StatsCache(tmp_path, enabled=False)
    compute = Counting()
    key = cache.key("data", resize_mode(), "sha:2048", 6)
    cache.get(key, compute)
    cache.get(key, compute)
    assert compute.calls == 2 and not list(tmp_path.iterdir())
