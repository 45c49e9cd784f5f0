"""Callbacks of a main.py run: the run directory, image grids, and checkpoints on a signal or a crash."""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from pytorch_lightning.trainer.states import TrainerFn
from torchvision.utils import make_grid

from ldm.data.resumable import local_state_only
from ldm.training.checkpoint_io import CheckpointWriteError
from ldm.training.clock import paused as train_clock_paused
from ldm.training.fault_tolerance import NonFiniteError
from ldm.training.evaluation import EvaluationCallback  # noqa: F401 - config target ldm.training.callbacks.EvaluationCallback
from ldm.util import atomic_path

logger = logging.getLogger(__name__)

# exceptions after which the emergency checkpoint is not written: a full disk, or a model stopped for NaN steps
UNSAVED_EXCEPTIONS = (CheckpointWriteError, NonFiniteError)


def save_yaml(config: Any, path: str) -> None:
    """Write an OmegaConf/dict config as YAML, atomically."""
    with atomic_path(path) as tmp:
        OmegaConf.save(config, tmp)


class SetupCallback(Callback):
    """Create the run directory (logdir, checkpoints/, configs/) and save the merged configs, on rank 0 only.

    Configs go to `configs/<now>-project.yaml` (everything but `lightning`) and `configs/<now>-lightning.yaml`;
    a resumed run adds a new pair next to the old ones, so the directory records every session.
    """

    def __init__(self, resume: Any, now: str, logdir: str, ckptdir: str, cfgdir: str, config: Any,
                 lightning_config: Any):
        super().__init__()
        self.resume = bool(resume)
        self.now, self.logdir, self.ckptdir, self.cfgdir = now, logdir, ckptdir, cfgdir
        self.config, self.lightning_config = config, lightning_config
        self._done = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Create the directories and write the configs once per process (the first stage that runs)."""
        if self._done or not trainer.is_global_zero:
            return
        self._done = True
        for directory in (self.logdir, self.ckptdir, self.cfgdir):
            os.makedirs(directory, exist_ok=True)
        stamp = self.now
        n = 0
        while any(os.path.exists(self._config_path(stamp, part)) for part in ("project", "lightning")):
            n += 1
            stamp = f"{self.now}.{n}"  # sorts after `now-...`, so a resume merges the newest last
        save_yaml(self.config, self._config_path(stamp, "project"))
        save_yaml(OmegaConf.create({"lightning": self.lightning_config}), self._config_path(stamp, "lightning"))
        logger.info("run directory %s (configs saved as %s-*.yaml)", self.logdir, stamp)
        logger.debug("project config:\n%s", OmegaConf.to_yaml(self.config))
        logger.debug("lightning config:\n%s", OmegaConf.to_yaml(self.lightning_config))

    def _config_path(self, stamp: str, part: str) -> str:
        return os.path.join(self.cfgdir, f"{stamp}-{part}.yaml")


class ImageLogger(Callback):
    """Every `batch_frequency` steps, call `pl_module.log_images(batch, split=..., **log_images_kwargs)` and save
    each returned image batch as a PNG grid under `<logdir>/images/<split>/` and into the loggers.

    The parameters are those of the originals' main.py (latent-diffusion, SD 1, generative-models): with
    `increase_log_steps` it also logs at steps 1, 2, 4, ... below the frequency. Images are expected in [-1, 1]:
    `clamp` clips them there and `rescale` maps them to [0, 1] for the grid. `log_on_batch_idx` counts batches of
    the epoch instead of global steps; step 0 is logged only with `log_first_step`, or before training starts with
    `log_before_first_step`. `disabled` turns it off. `enable_autocast` (generative-models) runs log_images on a
    CUDA device inside autocast (True, in the autocast dtype) or outside it (False, full precision); None leaves the
    autocast state as it is (latent-diffusion / SD 1, which had no such parameter).
    """

    def __init__(self, batch_frequency: int, max_images: int, clamp: bool = True, increase_log_steps: bool = True,
                 rescale: bool = True, disabled: bool = False, log_on_batch_idx: bool = False,
                 log_first_step: bool = False, log_images_kwargs: Mapping[str, Any] | None = None,
                 log_before_first_step: bool = False, enable_autocast: bool | None = None,
                 save_dir: str | None = None):
        super().__init__()
        if int(batch_frequency) < 1:
            raise ValueError(f"ImageLogger batch_frequency must be a positive integer, got {batch_frequency!r}")
        self.batch_freq = int(batch_frequency)
        self.max_images = int(max_images)
        self.clamp, self.rescale, self.disabled = clamp, rescale, disabled
        self.log_on_batch_idx, self.log_first_step = log_on_batch_idx, log_first_step
        self.log_before_first_step, self.enable_autocast = log_before_first_step, enable_autocast
        self.log_images_kwargs = dict(log_images_kwargs or {})
        self.save_dir = save_dir
        if increase_log_steps:
            self.log_steps = [2**n for n in range(int(np.log2(self.batch_freq)) + 1)]
        else:
            self.log_steps = [self.batch_freq]
        self._last_logged: dict[str, int] = {}

    def check_frequency(self, check_idx: int, split: str = "train", first: bool = False) -> bool:
        """Whether this step is one to log (each step once per split, however many batches share it); `first`
        asks for step 0 before training (log_before_first_step)."""
        if self._last_logged.get(split) == check_idx:
            return False
        due = check_idx % self.batch_freq == 0 or check_idx in self.log_steps
        if not due or (check_idx == 0 and not (self.log_first_step or first)):
            return False
        if check_idx in self.log_steps:
            self.log_steps.remove(check_idx)
        self._last_logged[split] = check_idx
        return True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """With log_before_first_step, log the first batch before the model has been trained on it."""
        if not self.disabled and self.log_before_first_step and pl_module.global_step == 0:
            self.log_img(trainer, pl_module, batch, batch_idx, split="train", first=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Log training images when due."""
        if not self.disabled:
            self.log_img(trainer, pl_module, batch, batch_idx, split="train")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Log validation images when due (never before the first optimisation step)."""
        if not self.disabled and pl_module.global_step > 0 and not trainer.sanity_checking:
            self.log_img(trainer, pl_module, batch, batch_idx, split="val")

    def log_img(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                split: str = "train", first: bool = False) -> None:
        """Run log_images (on every rank: sharded models need them all) and write the grids on rank 0."""
        log_images = getattr(pl_module, "log_images", None)
        check_idx = batch_idx if self.log_on_batch_idx else pl_module.global_step
        if not callable(log_images) or self.max_images <= 0 or not self.check_frequency(check_idx, split, first):
            return
        kwargs = dict(self.log_images_kwargs)
        if "N" not in kwargs and "N" in inspect.signature(log_images).parameters:
            kwargs["N"] = self.max_images
        was_training = pl_module.training
        pl_module.eval()
        cuda = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
        try:  # sampling must not change the random stream training continues with, nor count as training time
            with torch.no_grad(), torch.random.fork_rng(devices=cuda), self._autocast(pl_module.device), \
                    train_clock_paused(trainer):
                images = log_images(batch, split=split, **kwargs)
        finally:
            if was_training:
                pl_module.train()
        grids = {}
        for key, value in images.items():
            if isinstance(value, torch.Tensor) and value.ndim in (3, 4):
                value = (value[None] if value.ndim == 3 else value)[: self.max_images].detach().float().cpu()
                grids[key] = self._grid(value.clamp(-1.0, 1.0) if self.clamp else value)
        if trainer.is_global_zero:
            save_dir = self.save_dir or trainer.default_root_dir
            self.log_local(save_dir, split, grids, pl_module.global_step, pl_module.current_epoch, batch_idx)
            self._to_loggers(trainer, split, grids, pl_module.global_step)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """CUDA autocast on or off as `enable_autocast` says (generative-models' ImageLogger); no change when it is
        None or the module is not on CUDA (the original's torch.cuda.amp.autocast touches only CUDA tensors)."""
        if self.enable_autocast is None or device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", enabled=bool(self.enable_autocast), dtype=torch.get_autocast_dtype("cuda"))

    def _grid(self, images: torch.Tensor) -> torch.Tensor:
        grid = make_grid(images, nrow=4)
        if self.rescale:
            grid = (grid + 1.0) / 2.0
        return grid.clamp(0.0, 1.0)

    @staticmethod
    def log_local(save_dir: str, split: str, grids: Mapping[str, torch.Tensor], global_step: int,
                  current_epoch: int, batch_idx: int) -> None:
        """Save each CHW grid in [0, 1] as `images/<split>/<key>_gs-<step>_e-<epoch>_b-<batch>.png`."""
        root = os.path.join(save_dir, "images", split)
        os.makedirs(root, exist_ok=True)
        for key, grid in grids.items():
            array = (grid.permute(1, 2, 0).squeeze(-1).numpy() * 255).round().astype(np.uint8)
            name = f"{key}_gs-{global_step:06}_e-{current_epoch:06}_b-{batch_idx:06}.png"
            with atomic_path(os.path.join(root, name)) as tmp:
                Image.fromarray(array).save(tmp, format="PNG")

    @staticmethod
    def _to_loggers(trainer: pl.Trainer, split: str, grids: Mapping[str, torch.Tensor], step: int) -> None:
        for run_logger in trainer.loggers:
            for key, grid in grids.items():
                tag = f"{split}/{key}"
                if isinstance(run_logger, TensorBoardLogger):
                    run_logger.experiment.add_image(tag, grid, global_step=step)
                elif callable(getattr(run_logger, "log_image", None)):  # e.g. WandbLogger
                    run_logger.log_image(key=tag, images=[grid.permute(1, 2, 0).numpy()], step=step)


class EmergencyCheckpoint(Callback):
    """Write `last.ckpt` when asked by a signal (see `request`), when training dies of an exception or Ctrl-C, and
    when it ends by a limit after the last checkpoint.

    A signal only sets a flag; the checkpoint is written at the end of the current training batch, where the
    state is consistent (and, with several processes, where all of them agree to save); `request_stop` (SIGTERM,
    owned by this callback during training with `handle_sigterm`) then also ends training. After an exception only
    the rank-0 process writes, without waiting for the others, which is possible only when every process holds
    the full model (single device, DDP); sharded strategies skip it with a warning.
    """

    def __init__(self, ckpt_path: str, handle_sigterm: bool = False):
        super().__init__()
        self.ckpt_path, self.handle_sigterm = ckpt_path, handle_sigterm
        self._requested = False
        self._stop_requested = False
        self.stopped_by_signal = False
        self._saved_step: int | None = None

    def request(self, *_: Any) -> None:
        """Ask for a checkpoint at the end of the current batch (signal-handler safe: it only sets a flag)."""
        self._requested = True

    def request_stop(self, *_: Any) -> None:
        """Ask for a checkpoint at the end of the current batch and a clean stop after it (SIGTERM)."""
        self._requested = self._stop_requested = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Take rank 0's path: processes started separately (torchrun, srun) may have named their run directories at
        different seconds, and a sharded save needs every process to write into the same place."""
        if trainer.world_size > 1:
            self.ckpt_path = trainer.strategy.broadcast(self.ckpt_path, src=0)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With handle_sigterm, take SIGTERM back from the handler Lightning installs at fit start: Lightning's stops
        before the next batch without a save all processes take part in (it restores the previous one after fit)."""
        if self.handle_sigterm and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Save when any process was asked to."""
        requested, stop = self._requested, self._stop_requested
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if requested:
            self._requested = False
            logger.info("checkpoint requested by signal: saving %s at step %d", self.ckpt_path, trainer.global_step)
            self._adopt_as_last(trainer)
            trainer.save_checkpoint(self.ckpt_path)
            self._saved_step = trainer.global_step
        if stop:
            logger.warning("SIGTERM: stopping after step %d; resume with main.py -r", trainer.global_step)
            self.stopped_by_signal = True
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A run that ends by a limit (max_steps, max_time, a training-time budget) between two saves writes the
        state it stopped at as last.ckpt: Lightning's checkpoint last saved at a validation, and resuming or
        sampling from it would drop the steps after that (up to a minute of make demo's nine)."""
        if trainer.state.fn != TrainerFn.FITTING or trainer.global_step == 0 or self._saved_step == trainer.global_step:
            return
        for callback in trainer.checkpoint_callbacks:
            if (isinstance(callback, ModelCheckpoint) and callback.save_last
                    and getattr(callback, "_last_global_step_saved", None) == trainer.global_step):
                return  # Lightning's own last.ckpt is already of this step
        logger.info("training ended at step %d after the last checkpoint: saving %s", trainer.global_step,
                    self.ckpt_path)
        self._adopt_as_last(trainer)
        trainer.save_checkpoint(self.ckpt_path)
        self._saved_step = trainer.global_step

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Save the training state reached so far ("summoning checkpoint") before the process exits."""
        if trainer.state.fn != TrainerFn.FITTING or not trainer.optimizers or trainer.global_step == 0:
            return
        if isinstance(exception, UNSAVED_EXCEPTIONS) or self._saved_step == trainer.global_step:
            logger.info("not saving %s after %s (the last checkpoint stays as it is)", self.ckpt_path,
                        type(exception).__name__)
            return
        strategy = trainer.strategy
        local = isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(strategy, DeepSpeedStrategy)
        if not local:
            logger.warning("not saving %s after %s: %s needs every process to write a checkpoint",
                           self.ckpt_path, type(exception).__name__, type(strategy).__name__)
            return
        if not trainer.is_global_zero:
            return
        try:
            self._adopt_as_last(trainer)
            with local_state_only():  # the other processes are not taking part in this save
                checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            strategy.checkpoint_io.save_checkpoint(checkpoint, self.ckpt_path)
            logger.warning("%s during training: saved %s at step %d", type(exception).__name__, self.ckpt_path,
                           trainer.global_step)
        except Exception as err:  # noqa: BLE001 - the original exception is the one to report
            logger.error("could not save %s after %s: %s", self.ckpt_path, type(exception).__name__, err)

    def _adopt_as_last(self, trainer: pl.Trainer) -> None:
        """Let ModelCheckpoint callbacks that write the same last.ckpt treat ours as their own, so they keep
        overwriting it (instead of writing last-v1.ckpt next to it), also after a resume from it."""
        target = os.path.realpath(self.ckpt_path)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
                last = os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
                if os.path.realpath(last) == target:
                    callback.last_model_path = last  # compared by string with the path it formats itself

