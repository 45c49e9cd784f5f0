"""The training clock of a main.py run: wall time spent training, logged as a scalar so curves can be drawn
against compute time rather than steps (`scripts/plot_metrics.py --x time`)."""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn

logger = logging.getLogger(__name__)

TRAIN_SECONDS = "time/train_seconds"


class TrainClock(Callback):
    """Log `time/train_seconds` with the training metrics: seconds of training since the run began.

    The clock runs from the start of training (data loading, optimisation, checkpoints and image logging
    included) and stops during validation, image logging and inside `paused()` sections (for evaluation callbacks). It is
    part of the checkpoint, so a resumed run continues from the time it had reached.
    """

    def __init__(self, name: str = TRAIN_SECONDS) -> None:
        super().__init__()
        self.name = name
        self._before = 0.0  # seconds of earlier sessions (restored from the checkpoint)
        self._started: float | None = None
        self._excluded = 0.0
        self._pause_depth = 0
        self._pause_began = 0.0
        self._validating = False

    @property
    def state_key(self) -> str:
        """One clock per metric name in the checkpoint's callback states."""
        return self._generate_state_key(name=self.name)

    def elapsed(self) -> float:
        """Training seconds so far, over every session of the run."""
        if self._started is None:
            return self._before
        now = time.perf_counter()
        paused = self._excluded + (now - self._pause_began if self._pause_depth else 0.0)
        return self._before + now - self._started - paused

    def pause(self) -> None:
        """Stop the clock until the matching `resume` (pauses nest)."""
        if self._pause_depth == 0:
            self._pause_began = time.perf_counter()
        self._pause_depth += 1

    def resume(self) -> None:
        """End one `pause`."""
        if self._pause_depth == 0:
            return
        self._pause_depth -= 1
        if self._pause_depth == 0:
            self._excluded += time.perf_counter() - self._pause_began

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the clock inside the block."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start counting (after the sanity check and the checkpoint restore)."""
        self._started, self._excluded, self._pause_depth, self._validating = time.perf_counter(), 0.0, 0, False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Freeze the total, so a checkpoint written after training holds it."""
        self._before, self._started = self.elapsed(), None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Log the time reached, with this step's training metrics."""
        pl_module.log(self.name, self.elapsed(), on_step=True, on_epoch=False, batch_size=1)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Stop during validation inside fit."""
        if self._started is not None and trainer.state.fn == TrainerFn.FITTING:
            self._validating = True
            self.pause()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run again after validation."""
        if self._validating:
            self._validating = False
            self.resume()

    def state_dict(self) -> dict[str, Any]:
        """The time reached, for the checkpoint."""
        return {"train_seconds": self.elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a checkpoint's time."""
        self._before = float(state_dict.get("train_seconds", 0.0))


@contextlib.contextmanager
def paused(trainer: pl.Trainer) -> Iterator[None]:
    """Stop every TrainClock of `trainer` inside the block (e.g. around an evaluation during training)."""
    clocks = [callback for callback in getattr(trainer, "callbacks", None) or () if isinstance(callback, TrainClock)]
    for clock in clocks:
        clock.pause()
    try:
        yield
    finally:
        for clock in clocks:
            clock.resume()


def train_seconds_of(trainer: pl.Trainer) -> float | None:
    """The training seconds of the trainer's first TrainClock, None when it has none."""
    for callback in trainer.callbacks:
        if isinstance(callback, TrainClock):
            return callback.elapsed()
    return None


class TrainTimeCheckpoints(Callback):
    """Checkpoints at equal training time: `checkpoints/step=NNNNNN-train-seconds=S.ckpt` whenever the TrainClock
    passes another multiple of `every_seconds`, and the end of training once it passes `stop_after_seconds`.

    Compute budgets are then equal across models of different speed (the paper's Fig. 6 compares LDM-f at equal
    training time), and validation or image logging never eats into them, unlike Lightning's `max_time`.
    """

    def __init__(self, every_seconds: float, stop_after_seconds: float | None = None,
                 dirpath: str | None = None) -> None:
        super().__init__()
        if float(every_seconds) <= 0:
            raise ValueError(f"TrainTimeCheckpoints every_seconds must be positive, got {every_seconds}")
        self.every_seconds = float(every_seconds)
        self.stop_after_seconds = None if stop_after_seconds is None else float(stop_after_seconds)
        self.dirpath = dirpath
        self._next = self.every_seconds

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a resume, the next mark follows the time already reached."""
        reached = train_seconds_of(trainer)
        if reached is None:
            raise ValueError("TrainTimeCheckpoints needs the TrainClock callback (lightning.callbacks.train_clock)")
        self._next = (int(reached // self.every_seconds) + 1) * self.every_seconds

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Save at every mark passed; stop at the budget."""
        reached = train_seconds_of(trainer) or 0.0
        if reached >= self._next:
            mark = int(reached // self.every_seconds) * self.every_seconds
            directory = self.dirpath or trainer.checkpoint_callback.dirpath
            path = f"{directory}/step={trainer.global_step:06d}-train-seconds={reached:.0f}.ckpt"
            logger.info("training time %.1f s: checkpoint %s (step %d)", reached, path, trainer.global_step)
            with paused(trainer):  # writing the experiment's checkpoint is not training
                trainer.save_checkpoint(path)
            self._next = mark + self.every_seconds
        if self.stop_after_seconds is not None and reached >= self.stop_after_seconds:
            logger.info("training time budget of %.0f s reached at step %d", self.stop_after_seconds,
                        trainer.global_step)
            trainer.should_stop = True
