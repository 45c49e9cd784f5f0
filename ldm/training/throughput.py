"""Training throughput as users feel it: wall-clock (and process CPU) time of every optimisation step of a main.py
run. On a shared machine the CPU time (`time.process_time`: this process's threads, not the data workers) is the
steadier measure of our own cost; the wall clock is what a user waits."""
from __future__ import annotations

import json
import logging
import time
from typing import Any

from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from ldm.util import atomic_path

logger = logging.getLogger(__name__)


def steps_per_second(times: list[float], skip: int) -> float:
    """Steps per second over the steps after the first `skip` (warm-up: first batches, allocator, workers)."""
    if len(times) < skip + 2:
        raise ValueError(f"need at least {skip + 2} step times to skip {skip}, got {len(times)}")
    return (len(times) - 1 - skip) / (times[-1] - times[skip])


class StepTimer(Callback):
    """Records `time.perf_counter()` and `time.process_time()` at the end of every training batch; writes them as JSON
    (`times`, `cpu_times`) to `path` when training ends (and logs steps/s after `skip` warm-up steps). `scripts/benchmark_training.py` times main.py with it:

        lightning: {callbacks: {step_timer: {target: ldm.training.throughput.StepTimer, params: {path: t.json}}}}
    """

    def __init__(self, path: str | None = None, skip: int = 5) -> None:
        self.path, self.skip = path, skip
        self.start: float | None = None
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())

    @rank_zero_only
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if len(self.times) >= self.skip + 2:
            logger.info("training throughput: %.3f steps/s (after %d warm-up steps)",
                        steps_per_second(self.times, self.skip), self.skip)
        if self.path:
            with atomic_path(self.path) as tmp, open(tmp, "w") as f:
                json.dump({"start": self.start, "times": self.times, "cpu_times": self.cpu_times, "skip": self.skip}, f)
