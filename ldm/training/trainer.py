"""The Trainer of a main.py run: default logger, callbacks and checkpointing, with the `lightning:` config over them."""
from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.tensorboard import _TENSORBOARD_AVAILABLE
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from ldm.training.callbacks import EmergencyCheckpoint, SetupCallback
from ldm.training.checkpoint_io import AtomicCheckpointIO
from ldm.training.config import RunDir, UsageError
from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config

logger = logging.getLogger(__name__)

CHECKPOINT_TARGET = "lightning.pytorch.callbacks.ModelCheckpoint"
DEFAULT_CALLBACKS = {
    "image_logger": {"target": "ldm.training.callbacks.ImageLogger",
                     "params": {"batch_frequency": 750, "max_images": 4, "clamp": True}},
    "learning_rate_logger": {"target": "lightning.pytorch.callbacks.LearningRateMonitor",
                             "params": {"logging_interval": "step"}},
    "train_clock": {"target": "ldm.training.clock.TrainClock", "params": {}},
}
# the second logger every run has: scalars in <logdir>/csv/metrics.csv (lightning.csv_logger: null disables it)
CSV_LOGGER_KEY = "csv_logger"
# the original's optional periodic checkpoints that are never deleted (enabled by naming it in lightning.callbacks)
TRAINSTEP_CHECKPOINTS = "metrics_over_trainsteps_checkpoint"


def _same_target(a: str, b: str) -> bool:
    """Whether two dotted paths name the same object (`main.ImageLogger` is `ldm.training.callbacks.ImageLogger`)."""
    if a == b:
        return True
    try:
        return get_obj_from_str(a) is get_obj_from_str(b)
    except ConfigError:
        return False


def _accepts(target: str, key: str) -> bool:
    try:
        return key in inspect.signature(get_obj_from_str(target)).parameters
    except (ConfigError, TypeError, ValueError):
        return False


def over_default(default: dict[str, Any], user: Any, portable: dict[str, Any] | None = None) -> DictConfig | None:
    """A user's `target`/`params` config merged over a default one. A user config naming another class keeps
    only the `portable` defaults it accepts (e.g. save_dir); `None` given explicitly disables the component."""
    if user is None:
        return OmegaConf.create(default)
    if not isinstance(user, DictConfig):
        raise UsageError(f"expected a target/params mapping or null, got {user!r}")
    target = user.get("target")
    if target is None or _same_target(str(target), default["target"]):
        return OmegaConf.merge(default, user)
    user = user.copy()
    for key, value in (portable or {}).items():
        if value is not None and _accepts(str(target), key) and key not in user.get("params", {}):
            OmegaConf.update(user, f"params.{key}", value)
    return user


def csv_logger_config(run: RunDir) -> dict[str, Any]:
    """Scalars in `<logdir>/csv/metrics.csv`, appended to when the run is resumed."""
    return {"target": "ldm.training.csv_logger.AppendingCSVLogger",
            "params": {"save_dir": run.logdir, "name": "", "version": "csv"}}


def default_logger_config(run: RunDir) -> dict[str, Any]:
    """TensorBoard in `<logdir>/tensorboard`, or CSV files in `<logdir>/csv` when tensorboard is missing."""
    if _TENSORBOARD_AVAILABLE:
        return {"target": "lightning.pytorch.loggers.TensorBoardLogger",
                "params": {"save_dir": run.logdir, "name": "", "version": "tensorboard"}}
    logger.info("tensorboard is not installed; logging metrics to CSV files only")
    return csv_logger_config(run)


def build_loggers(lightning_config: DictConfig, run: RunDir, project: str | None = None) -> list[Logger]:
    """`lightning.logger` over the default (TensorBoard), then `lightning.csv_logger` over the CSV logger.

    The CSV logger is left out when `lightning.csv_logger: null` or when the first logger already writes
    the same CSV directory."""
    cfg = over_default(default_logger_config(run), lightning_config.get("logger"),
                       {"save_dir": run.logdir, "project": project})
    loggers = [instantiate_from_config(cfg, path="lightning.logger")]
    if CSV_LOGGER_KEY in lightning_config and lightning_config.get(CSV_LOGGER_KEY) is None:
        logger.info("CSV metrics disabled by lightning.%s: null", CSV_LOGGER_KEY)
        return loggers
    try:
        cfg = over_default(csv_logger_config(run), lightning_config.get(CSV_LOGGER_KEY), {"save_dir": run.logdir})
    except UsageError as err:
        raise UsageError(f"lightning.{CSV_LOGGER_KEY}: {err}") from err
    csv_logger = instantiate_from_config(cfg, path=f"lightning.{CSV_LOGGER_KEY}")
    first = loggers[0]
    if isinstance(first, CSVLogger) and isinstance(csv_logger, CSVLogger) and first.log_dir == csv_logger.log_dir:
        return loggers
    return loggers + [csv_logger]


def checkpoint_config(run: RunDir, model: Any, user: Any) -> DictConfig:
    """ModelCheckpoint into checkpoints/: last.ckpt always, and the 3 best on `model.monitor` when it has one."""
    params: dict[str, Any] = {"dirpath": run.ckptdir, "filename": "{epoch:06}", "verbose": True, "save_last": True}
    monitor = getattr(model, "monitor", None)
    if monitor:
        logger.info("monitoring %s as checkpoint metric", monitor)
        params.update(monitor=monitor, save_top_k=3)
    return over_default({"target": CHECKPOINT_TARGET, "params": params}, user, {"dirpath": run.ckptdir})


def build_callbacks(lightning_config: DictConfig, run: RunDir, model: Any, config: DictConfig,
                    options: dict[str, Any], emergency: EmergencyCheckpoint) -> list[Callback]:
    """SetupCallback, the configured callbacks over the defaults, the emergency checkpoint, tqdm, ModelCheckpoint."""
    user_callbacks = lightning_config.get("callbacks") or OmegaConf.create()
    names = list(DEFAULT_CALLBACKS) + [name for name in user_callbacks if name not in DEFAULT_CALLBACKS]
    callbacks: list[Callback] = [SetupCallback(resume=run.resume_ckpt, now=run.now, logdir=run.logdir,
                                               ckptdir=run.ckptdir, cfgdir=run.cfgdir, config=config,
                                               lightning_config=lightning_config)]
    for name in names:
        user = user_callbacks.get(name)
        if name in user_callbacks and user is None:
            logger.info("callback %s disabled by lightning.callbacks.%s: null", name, name)
            continue
        if name in DEFAULT_CALLBACKS:
            cfg = over_default(DEFAULT_CALLBACKS[name], user)
        elif name == TRAINSTEP_CHECKPOINTS:
            default = {"target": CHECKPOINT_TARGET,
                       "params": {"dirpath": os.path.join(run.ckptdir, "trainstep_checkpoints"),
                                  "filename": "{epoch:06}-{step:09}", "verbose": True, "save_top_k": -1,
                                  "every_n_train_steps": 10000, "save_weights_only": True}}
            cfg = over_default(default, user)
        else:
            cfg = user
        callbacks.append(instantiate_from_config(cfg, path=f"lightning.callbacks.{name}"))
    callbacks.append(emergency)
    if options.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(TQDMProgressBar())
    if options.get("enable_checkpointing", True):
        cfg = checkpoint_config(run, model, lightning_config.get("modelcheckpoint"))
        callbacks.append(instantiate_from_config(cfg, path="lightning.modelcheckpoint"))
    return callbacks


def build_trainer(options: dict[str, Any], lightning_config: DictConfig, run: RunDir, model: Any,
                  config: DictConfig, emergency: EmergencyCheckpoint, project: str | None = None) -> pl.Trainer:
    """The Trainer for this run, with atomic checkpoint writes (DeepSpeed writes its own checkpoints)."""
    options = dict(options)
    loggers = build_loggers(lightning_config, run, project)
    callbacks = build_callbacks(lightning_config, run, model, config, options, emergency)
    plugins = options.pop("plugins", None) or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not str(options.get("strategy", "")).startswith("deepspeed"):
        plugins.append(AtomicCheckpointIO())
    try:
        return pl.Trainer(**options, logger=loggers, callbacks=callbacks, plugins=plugins,
                          default_root_dir=run.logdir)
    except (MisconfigurationException, ValueError) as err:
        raise UsageError(f"lightning.trainer / Trainer flags: {str(err).strip().splitlines()[0]}") from err
