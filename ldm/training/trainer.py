"""The Trainer of a main.py run: default logger, callbacks and checkpointing, with the `lightning:` config over them."""
from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, ProgressBar, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.loggers.tensorboard import _TENSORBOARD_AVAILABLE
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from ldm.training.callbacks import EmergencyCheckpoint, SetupCallback
from ldm.training.checkpoint_io import AtomicCheckpointIO
from ldm.training.fault_tolerance import ModuleBatchEndFirst, RandomState
from ldm.training.config import RunDir, UsageError
from ldm.util import ConfigError, first_line, get_obj_from_str, instantiate_from_config

logger = logging.getLogger(__name__)

CHECKPOINT_TARGET = "pytorch_lightning.callbacks.ModelCheckpoint"
DEFAULT_CALLBACKS = {
    "image_logger": {"target": "ldm.training.callbacks.ImageLogger",
                     "params": {"batch_frequency": 750, "max_images": 4, "clamp": True}},
    "learning_rate_logger": {"target": "pytorch_lightning.callbacks.LearningRateMonitor",
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
        return {"target": "pytorch_lightning.loggers.TensorBoardLogger",
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
    callbacks.extend(fault_tolerance_callbacks(lightning_config))  # before the callbacks that save
    callbacks.append(emergency)
    if options.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(TQDMProgressBar())
    if options.get("enable_checkpointing", True):
        cfg = checkpoint_config(run, model, lightning_config.get("modelcheckpoint"))
        callbacks.append(instantiate_from_config(cfg, path="lightning.modelcheckpoint"))
    return callbacks


SPEED_KEYS = ("compile", "channels_last")


def speed_options(lightning_config: DictConfig, flags: dict[str, Any]) -> dict[str, bool]:
    """The speed switches of a run (`ldm.acceleration.accelerate`): `lightning.speed.{compile,channels_last}` with
    main.py's --compile / --channels_last over them (None: not given). Both default to off."""
    speed = lightning_config.get("speed") or {}
    unknown = set(speed) - set(SPEED_KEYS)
    if unknown:
        raise UsageError(f"lightning.speed.{sorted(unknown)[0]} is unknown; expected {', '.join(SPEED_KEYS)}")
    return {key: bool(flags[key] if flags.get(key) is not None else speed.get(key, False)) for key in SPEED_KEYS}


def fault_tolerance_callbacks(lightning_config: DictConfig) -> list[Callback]:
    """NaNGuard (`lightning.nan_guard`: params, or null/false to turn it off), RandomState
    (`lightning.random_state: false` turns it off), and ModuleBatchEndFirst (EMA updates before checkpoints)."""
    out: list[Callback] = []
    guard = lightning_config.get("nan_guard", {})
    if guard not in (None, False):
        params = OmegaConf.to_container(guard) if isinstance(guard, DictConfig) else guard
        if not isinstance(params, dict):
            raise UsageError(f"lightning.nan_guard: expected a mapping like {{max_consecutive: 10}} or null, "
                             f"got {guard!r}")
        out.append(instantiate_from_config({"target": "ldm.training.fault_tolerance.NaNGuard", "params": params},
                                           path="lightning.nan_guard"))
    else:
        logger.info("NaN guard disabled by lightning.nan_guard: %s", guard)
    if lightning_config.get("random_state", True):
        out.append(RandomState())
    out.append(ModuleBatchEndFirst())
    return out


def build_trainer(options: dict[str, Any], lightning_config: DictConfig, run: RunDir, model: Any,
                  config: DictConfig, emergency: EmergencyCheckpoint, project: str | None = None) -> pl.Trainer:
    """The Trainer for this run, with atomic checkpoint writes (DeepSpeed writes its own checkpoints)."""
    options = dict(options)
    loggers = build_loggers(lightning_config, run, project)
    callbacks = build_callbacks(lightning_config, run, model, config, options, emergency)
    strategy = options.get("strategy")
    if isinstance(strategy, dict) and "target" in strategy:  # a Strategy object from its config
        options["strategy"] = instantiate_from_config(strategy, path="lightning.trainer.strategy")
    plugins = options.pop("plugins", None) or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    strategy_config = lightning_config.get("strategy")
    if strategy_config is not None:
        if options.get("strategy", "auto") != "auto":
            raise UsageError("lightning.strategy and lightning.trainer.strategy / --strategy both name the strategy; "
                             "keep one")
        options["strategy"] = instantiate_from_config(strategy_config, path="lightning.strategy")
    strategy = options.get("strategy", "")
    if not (str(strategy).startswith("deepspeed") or isinstance(strategy, DeepSpeedStrategy)):
        plugins.append(AtomicCheckpointIO())
    try:
        trainer = pl.Trainer(**options, logger=loggers, callbacks=callbacks, plugins=plugins,
                             default_root_dir=run.logdir)
    except (MisconfigurationException, ValueError) as err:
        raise UsageError(f"lightning.trainer / Trainer flags: {first_line(err)}") from err
    apply_find_unused_parameters(trainer, lightning_config.get("find_unused_parameters"))
    return trainer


def apply_find_unused_parameters(trainer: pl.Trainer, value: Any) -> None:
    """`lightning.find_unused_parameters` (SD 2's inpainting config) for the DDP wrapper of whatever DDP strategy
    the Trainer chose (also `auto` on several devices); other strategies have no such option."""
    if value is None:
        return
    if not isinstance(value, bool):
        raise UsageError(f"lightning.find_unused_parameters must be true or false, got {value!r}")
    if isinstance(trainer.strategy, DDPStrategy):
        trainer.strategy._ddp_kwargs["find_unused_parameters"] = value  # read when the model is wrapped, at fit
    else:
        logger.info("lightning.find_unused_parameters=%s has no effect: the strategy is %s, not DDP", value,
                    type(trainer.strategy).__name__)
