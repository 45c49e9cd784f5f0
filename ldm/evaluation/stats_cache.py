"""Real-data statistics cached on disk, so repeated evaluations against the same data do not recompute them.

An entry holds the pool features (KID and precision/recall need them) and FID's mean and covariance, keyed by
what determines them: a fingerprint of the data (image files' names, sizes and mtimes, or a dataset's config and
length), the resize mode, the sha256 of the extractor weights and the sample count. Entries are safetensors files
written atomically under `<cache>/real_stats/`; one that cannot be read or does not match its key is recomputed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ldm.evaluation.common import cache_dir
from ldm.evaluation.fidelity import FeatureStatistics
from ldm.util import atomic_path

logger = logging.getLogger(__name__)

FORMAT = 1
RESIZE_MODE = "torch-fidelity-tf1-bilinear-299"  # how the extractor brings every image to 299x299


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def folder_fingerprint(files: Sequence[str]) -> str:
    """sha256 over the files' paths, sizes and modification times (changes when any image is added, removed or
    rewritten)."""
    lines = []
    for path in files:
        stat = os.stat(path)
        lines.append(f"{os.path.realpath(path)}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return _digest("\n".join(lines))


def dataset_fingerprint(dataset_config: Any, split: str, length: int) -> str:
    """sha256 over a dataset's config (target and params, as YAML), its split and its length."""
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(OmegaConf.create(dataset_config), resolve=True, sort_keys=True) \
        if dataset_config is not None else "null"
    return _digest(f"{text}\n{split}\n{length}")


def resize_mode(resize: int = 0) -> str:
    """The resize mode of a cache key: the extractor's own resize, after an optional resize-and-crop to `resize`."""
    return f"resize-crop-{resize}+{RESIZE_MODE}" if resize else RESIZE_MODE


class StatsCache:
    """Real-data statistics on disk under `root` (default `<cache_dir()>/real_stats`); `enabled=False` computes
    every time."""

    def __init__(self, root: str | os.PathLike | None = None, enabled: bool = True):
        self.root = Path(root) if root is not None else cache_dir() / "real_stats"
        self.enabled = enabled

    @staticmethod
    def key(data: str, resize: str, extractor: str, n: int) -> dict[str, str]:
        """The parts that determine an entry (all strings, as safetensors metadata stores them)."""
        return {"format": str(FORMAT), "data": data, "resize": resize, "extractor": extractor, "n": str(int(n))}

    def path(self, key: Mapping[str, str]) -> Path:
        """The entry's file: named by the hash of its key."""
        return self.root / f"{_digest(json.dumps(dict(key), sort_keys=True))[:32]}.safetensors"

    def load(self, key: Mapping[str, str]) -> FeatureStatistics | None:
        """The cached statistics for `key`, or None when absent, unreadable or recorded under another key."""
        from safetensors import safe_open

        path = self.path(key)
        if not self.enabled or not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                if dict(handle.metadata() or {}) != dict(key):
                    raise ValueError("its key differs")
                features, mu, sigma = (handle.get_tensor(name) for name in ("features", "mu", "sigma"))
            if len(features) != int(key["n"]) or mu.shape != features.shape[1:] or sigma.shape != (len(mu), len(mu)):
                raise ValueError("its shapes do not fit")
        except Exception as err:  # noqa: BLE001 - any unreadable entry is recomputed
            logger.warning("ignoring the cached statistics %s (%s); recomputing them", path, err)
            return None
        logger.info("real-data statistics from the cache: %s", path)
        return FeatureStatistics(features, mu.numpy(), sigma.numpy())

    def save(self, key: Mapping[str, str], stats: FeatureStatistics) -> Path:
        """Write the statistics for `key` atomically; returns the file."""
        from safetensors.torch import save_file

        path = self.path(key)
        tensors = {"features": stats.features.contiguous(), "mu": torch.from_numpy(stats.mu.copy()),
                   "sigma": torch.from_numpy(stats.sigma.copy())}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=dict(key))
        return path

    def get(self, key: Mapping[str, str], compute: Callable[[], FeatureStatistics]) -> FeatureStatistics:
        """The cached statistics for `key`, else `compute()` (stored for next time)."""
        stats = self.load(key)
        if stats is None:
            stats = compute()
            if self.enabled:
                logger.info("real-data statistics cached in %s", self.save(key, stats))
        return stats
