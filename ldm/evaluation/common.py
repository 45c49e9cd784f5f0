"""What every evaluation module shares: the error type, metric names that carry the sample count, environment
variables and the cache directory."""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ldm.util import ConfigError

CACHE_ENV = "LDM_CACHE_DIR"
INCEPTION_ENV = "LDM_INCEPTION_WEIGHTS"
LPIPS_VGG_ENV = "LDM_LPIPS_VGG_WEIGHTS"
CLIP_ENV = "LDM_CLIP_MODEL"

# what users may ask for, and the canonical metric each name stands for
METRIC_ALIASES = {
    "fid": "fid", "kid": "kid", "prc": "prc", "precision": "prc", "recall": "prc", "isc": "isc", "is": "isc",
    "inception_score": "isc", "clip": "clip", "clip_score": "clip", "rfid": "rfid", "psnr": "psnr", "ssim": "ssim",
    "lpips": "lpips",
}
FIDELITY_METRICS = ("fid", "kid", "prc", "isc")  # generated images against real ones, through Inception features
FIRST_STAGE_METRICS = ("rfid", "psnr", "ssim", "lpips")  # reconstructions against their inputs


class EvaluationError(ConfigError):
    """A missing or unusable input of an evaluation (weights, folder, metric name); one line naming the flag,
    environment variable, config key or file to fix. A ConfigError, so scripts and main.py print it as one line."""


def count_label(n: int) -> str:
    """A sample count as metric names show it: 500, 1k, 1.5k, 50k (1234 stays 1234)."""
    if n >= 1000 and n % 100 == 0:
        return f"{n / 1000:g}k"
    return str(n)


DEFAULT_LAYER = "2048"  # the Inception pool features FID, KID and PRC are defined on


def metric_name(metric: str, n: int, suffix: str = "", layer: str = DEFAULT_LAYER) -> str:
    """`fid@2k`, `kid_std@500`, `fid_floor@1k`: the metric with its sample count (FID is only comparable at equal
    n), `suffix` appended to the metric before the count; features of another Inception layer than the 2048-d pool
    are named too (`fid_d64@1k`), as such values are not comparable with the usual ones."""
    tags = [metric] + ([suffix] if suffix else []) + ([f"d{layer}"] if layer != DEFAULT_LAYER else [])
    return f"{'_'.join(tags)}@{count_label(n)}"


def parse_metrics(names: Iterable[str], where: str = "--metrics") -> list[str]:
    """Canonical metric names (fid, kid, prc, isc, clip, rfid, psnr, ssim, lpips), each once, in the order given."""
    out: list[str] = []
    for name in names:
        key = METRIC_ALIASES.get(str(name).strip().lower())
        if key is None:
            raise EvaluationError(f"{where}: unknown metric '{name}'; expected some of {sorted(METRIC_ALIASES)}")
        if key not in out:
            out.append(key)
    if not out:
        raise EvaluationError(f"{where}: no metric given; expected some of {sorted(METRIC_ALIASES)}")
    return out


def cache_dir() -> Path:
    """Where the framework keeps what it builds once: $LDM_CACHE_DIR, else ~/.cache/ldm."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "ldm"


def first_given(*values: str | os.PathLike | None) -> str | None:
    """The first value that is neither None nor empty, as a string."""
    for value in values:
        if value:
            return os.fspath(value)
    return None
