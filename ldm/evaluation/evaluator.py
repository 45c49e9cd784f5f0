"""One evaluation, as scripts/evaluate.py and the training callback run it: what the metrics need (weights
resolved up front, models loaded on first use), the per-sample rows of a share of the samples (features, per-image
scores), and the scores from all rows.

Rows are computed batch by batch over given index batches (`ldm.evaluation.distributed.shard_batches`), so a
caller running several processes gathers them (`gather_rows`) before scoring; one process passes every batch.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from ldm.evaluation.clip_score import ClipScore, resolve_clip_model
from ldm.evaluation.common import (DEFAULT_LAYER, FIDELITY_METRICS, FIRST_STAGE_METRICS, EvaluationError,
                                   metric_name)
from ldm.evaluation.features import FEATURE_DIMS, InceptionFeatures, hwc_to_uint8, to_uint8
from ldm.evaluation.fidelity import FeatureStatistics, FidelityOptions, Scores, fid_from_statistics, fidelity_scores
from ldm.evaluation.first_stage import (build_lpips_metric, mean_scores, per_image_scores, reconstruct,
                                        resolve_vgg_weights)
from ldm.evaluation.generation import SamplingSpec, generate
from ldm.evaluation.inception import resolve_inception_weights
from ldm.evaluation.stats_cache import StatsCache

logger = logging.getLogger(__name__)

RECON, INPUT = "recon/", "input/"  # row-name prefixes of reconstruction features and input features


@dataclass
class WeightFlags:
    """How the caller names the three weights sources in error messages."""

    inception: str = "--inception-weights"
    lpips_vgg: str = "--lpips-vgg-weights"
    clip: str = "--clip-model"


@dataclass
class Evaluator:
    """The metrics of one evaluation and the models they need (Inception, LPIPS, CLIP), resolved when built."""

    metrics: Sequence[str]
    inception_weights: str | None = None
    lpips_vgg_weights: str | None = None
    clip_model: str | None = None
    device: torch.device | str = "cpu"
    batch_size: int = 64
    options: FidelityOptions = field(default_factory=FidelityOptions)
    cache: StatsCache | None = None
    progress: bool = True
    flags: WeightFlags = field(default_factory=WeightFlags)
    feature_layer: str = DEFAULT_LAYER  # torch-fidelity's feature_layer_fid/kid/prc: 64, 192, 768 or 2048

    def __post_init__(self) -> None:
        self.metrics = list(self.metrics)
        needs_inception = any(m in self.metrics for m in (*FIDELITY_METRICS, "rfid"))
        self.inception = resolve_inception_weights(self.inception_weights, self.flags.inception) \
            if needs_inception else None
        self.lpips_source = resolve_vgg_weights(self.lpips_vgg_weights, self.flags.lpips_vgg) \
            if "lpips" in self.metrics else None
        self.clip_source = resolve_clip_model(self.clip_model, self.flags.clip) if "clip" in self.metrics else None
        self._extractor: InceptionFeatures | None = None
        self._lpips: Any = None
        self._clip: ClipScore | None = None

    # ---- models, loaded on first use --------------------------------------------------------------------
    @property
    def extractor(self) -> InceptionFeatures:
        """torch-fidelity's Inception extractor with the resolved weights."""
        if self.inception is None:
            raise ValueError("no Inception-based metric was asked for")
        if self._extractor is None or self._extractor.device != torch.device(self.device):
            self._extractor = InceptionFeatures(self.inception, self.device, self.feature_layer)
        return self._extractor

    @property
    def lpips(self) -> Any:
        """lpips.LPIPS(net='vgg') with the resolved VGG16 trunk."""
        if self._lpips is None:
            self._lpips = build_lpips_metric(*self.lpips_source, device=self.device)
        return self._lpips.to(self.device)

    @property
    def clip(self) -> ClipScore:
        """torchmetrics' CLIPScore over the resolved CLIP folder."""
        if self._clip is None:
            self._clip = ClipScore(*self.clip_source, device=self.device)
        return self._clip

    @property
    def fidelity_metrics(self) -> list[str]:
        """The asked-for metrics that compare generated with real images."""
        return [m for m in self.metrics if m in FIDELITY_METRICS]

    def _bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="img", disable=not self.progress, leave=False)

    # ---- rows of a share of the samples ---------------------------------------------------------------
    def features(self, batches: Iterable[torch.Tensor], total: int | None = None, desc: str = "Inception features",
                 allow_empty: bool = False) -> dict[str, torch.Tensor]:
        """Inception features (pool, and logits when available) of uint8 NCHW batches."""
        return self.extractor.extract(batches, total, desc, self.progress, allow_empty)

    def dataset_features(self, dataset: Any, batches: Sequence[Sequence[int]], key: str = "image",
                         desc: str = "real images") -> dict[str, torch.Tensor]:
        """Inception features of `dataset[i][key]` for the indices of `batches`."""
        images = (hwc_to_uint8(torch.stack([torch.as_tensor(dataset[int(i)][key]) for i in batch]))
                  for batch in batches)
        return self.features(images, sum(map(len, batches)), desc, allow_empty=True)

    def sample_rows(self, model: Any, spec: SamplingSpec, seeds: Sequence[int], conditions: Sequence | None,
                    batches: Sequence[Sequence[int]],
                    on_images: Callable[[Sequence[int], torch.Tensor], None] | None = None) -> dict[str, torch.Tensor]:
        """Draw the samples of `batches` (global indices into seeds/conditions) and return their features; the CLIP
        score, when asked for, accumulates their captions. `on_images(indices, uint8 images)` sees every batch."""
        rows: list[dict[str, torch.Tensor]] = []
        with self._bar(sum(map(len, batches)), "sampling") as bar:
            for batch in batches:
                conds = None if conditions is None else [conditions[i] for i in batch]
                images = generate(model, spec, [seeds[i] for i in batch], conds)
                if on_images is not None:
                    on_images(batch, images)
                if "clip" in self.metrics:
                    if conds is None or not all(isinstance(c, str) for c in conds):
                        raise EvaluationError("clip: the CLIP score needs a text-conditioned model (captions)")
                    self.clip.update(images, conds)
                if self.inception is not None:
                    rows.append(self.extractor(images))
                bar.update(len(batch))
        return _cat(rows, self.extractor.layers if self.inception is not None else [])

    def reconstruction_rows(self, model: Any, dataset: Any, batches: Sequence[Sequence[int]], key: str = "image"
                            ) -> dict[str, torch.Tensor]:
        """Per-image PSNR/SSIM/LPIPS of an autoencoder's reconstructions, and the Inception pool features of the
        reconstructions and of their inputs (for rFID)."""
        rows: list[dict[str, torch.Tensor]] = []
        wanted = [m for m in self.metrics if m in ("psnr", "ssim", "lpips")]
        with self._bar(sum(map(len, batches)), "reconstructing") as bar:
            for batch in batches:
                x = hwc_to_uint8(torch.stack([torch.as_tensor(dataset[int(i)][key]) for i in batch]))
                x = (x.float() / 127.5 - 1.0).to(self.device)  # the quantised inputs the features also see
                with torch.no_grad():
                    xrec = reconstruct(model, x)
                row = per_image_scores(x, xrec, wanted, self.lpips if "lpips" in wanted else None)
                if "rfid" in self.metrics:
                    row[RECON + self.feature_layer] = self.extractor(to_uint8(xrec))[self.feature_layer]
                    row[INPUT + self.feature_layer] = self.extractor(to_uint8(x))[self.feature_layer]
                rows.append(row)
                bar.update(len(batch))
        names = wanted + ([RECON + self.feature_layer, INPUT + self.feature_layer] if "rfid" in self.metrics else [])
        return _cat(rows, names)

    # ---- scores from all rows --------------------------------------------------------------------------
    def real_statistics(self, compute: Callable[[], Mapping[str, torch.Tensor]], data: str, n: int,
                        resize: str) -> FeatureStatistics:
        """Statistics of real images: from the cache when it holds them for (data fingerprint, resize mode,
        weights, n), else `compute()` -> features (then cached)."""
        def build() -> FeatureStatistics:
            return FeatureStatistics.from_features(compute()[self.feature_layer])

        if self.cache is None:
            return build()
        extractor = f"{self.inception.sha256}:{self.feature_layer}"
        return self.cache.get(self.cache.key(data, resize, extractor, n), build)

    def generation_scores(self, rows: Mapping[str, torch.Tensor], real: FeatureStatistics | None,
                          n: int, suffix: str = "") -> Scores:
        """FID/KID/PRC/IS of the generated rows against the real statistics, and the CLIP score."""
        scores = Scores()
        if self.fidelity_metrics:
            scores.update(fidelity_scores(rows, real, self.fidelity_metrics, self.options, suffix, self.feature_layer))
        if "clip" in self.metrics:
            scores.values.update(self.clip.compute(n, suffix))
            self.clip.reset()
        return scores

    def first_stage_scores(self, rows: Mapping[str, torch.Tensor], suffix: str = "") -> Scores:
        """rFID and mean PSNR/SSIM/LPIPS from reconstruction rows."""
        scores = Scores(values=mean_scores({m: rows[m] for m in ("psnr", "ssim", "lpips") if m in rows}, suffix))
        if "rfid" in self.metrics:
            recon, inputs = rows[RECON + self.feature_layer], rows[INPUT + self.feature_layer]
            fid = fid_from_statistics(FeatureStatistics.from_features(recon), FeatureStatistics.from_features(inputs))
            scores.values[metric_name("rfid", len(recon), suffix, self.feature_layer)] = fid
        return scores

    def check_metrics_for(self, autoencoder: bool, where: str = "--metrics") -> None:
        """First-stage metrics belong to autoencoders, generation metrics to diffusion models and folders."""
        if autoencoder:
            wrong = [m for m in self.metrics if m not in FIRST_STAGE_METRICS]
            kind = "an autoencoder: its metrics are rfid, psnr, ssim, lpips"
        else:
            wrong = [m for m in self.metrics if m in FIRST_STAGE_METRICS]
            kind = "generated images: first-stage metrics (rfid, psnr, ssim, lpips) need an autoencoder"
        if wrong:
            raise EvaluationError(f"{where}: {', '.join(wrong)} cannot be computed for {kind}")


def _cat(rows: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Rows of several batches concatenated per name (zero rows of the right width when there are none)."""
    if rows:
        return {name: torch.cat([row[name] for row in rows]) for name in rows[0]}
    widths = {**FEATURE_DIMS, **{prefix + layer: dim for prefix in (RECON, INPUT) for layer, dim in FEATURE_DIMS.items()}}
    return {name: torch.zeros((0, widths[name])) if name in widths else torch.zeros(0, dtype=torch.float64)
            for name in names}
