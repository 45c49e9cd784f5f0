"""From main.py's flags to a run: where it lives, its merged config, its Trainer options and learning rate.

Everything here raises `UsageError` (one line, naming the flag, file or config key) for a user mistake.
"""
from __future__ import annotations

import contextlib
import difflib
import glob
import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.errors import UserError

logger = logging.getLogger(__name__)

# rank 0 of a run launched by Lightning's subprocess launcher tells its children where the run lives
LOGDIR_ENV = "LDM_MAIN_LOGDIR"

# Trainer arguments main.py sets itself; the config cannot
RESERVED_TRAINER_KEYS = {"logger": "lightning.logger", "callbacks": "lightning.callbacks",
                         "default_root_dir": "-l/--logdir"}
# Trainer arguments Lightning refuses for LightningModules that optimise manually
MANUAL_OPTIMIZATION_UNSUPPORTED = ("accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm")
TRUE_WORDS, FALSE_WORDS = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")


class UsageError(UserError):
    """A mistake in the command line or the configs; the message is one line that names what to fix."""


def str2bool(value: Any) -> bool:
    """'true'/'false' (and yes/no, t/f, y/n, 1/0) as a bool, for flags like `--scale_lr False`."""
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


@dataclass
class RunDir:
    """Where a run writes: `logdir` with checkpoints/ and configs/; `resume_ckpt` when it continues one."""

    logdir: str
    now: str
    resume_ckpt: str | None = None
    saved_configs: list[str] = field(default_factory=list)

    @property
    def nowname(self) -> str:
        return os.path.basename(os.path.normpath(self.logdir))

    @property
    def ckptdir(self) -> str:
        return os.path.join(self.logdir, "checkpoints")

    @property
    def cfgdir(self) -> str:
        return os.path.join(self.logdir, "configs")


def resolve_run(now: str, name: str | None, resume: str | None, base: Sequence[str], logdir: str, postfix: str,
                debug: bool, rank_zero: bool) -> RunDir:
    """The run directory: the resumed run's, or `<logdir>/<now>_<name><postfix>` (`debug_runs/` with -d).

    Only rank 0 checks the file system for a free name; other processes take rank 0's choice from the
    environment (Lightning's launcher copies it) or compute the same name.
    """
    if resume:
        if name:
            raise UsageError("-n/--name and -r/--resume cannot be used together: a resumed run keeps its directory; "
                             "to start a new run from a checkpoint use -n with model.params.ckpt_path=<file>")
        return _resumed_run(now, resume)
    if name:
        suffix = "_" + name
    elif base:
        suffix = "_" + os.path.splitext(os.path.basename(base[0]))[0]
    else:
        suffix = ""
    root = os.path.join(logdir, "debug_runs") if debug else logdir
    inherited = os.environ.get(LOGDIR_ENV)
    if inherited and not rank_zero:
        return RunDir(logdir=inherited, now=now)
    path = os.path.join(root, now + suffix + postfix)
    if rank_zero:  # never reuse an existing run directory (two runs started in the same second)
        candidate, n = path, 0
        while os.path.exists(candidate):
            n += 1
            candidate = f"{path}-{n}"
        path = candidate
    return RunDir(logdir=path, now=now)


def _resumed_run(now: str, resume: str) -> RunDir:
    expected = "a run directory logs/<run> or a checkpoint logs/<run>/checkpoints/<file>.ckpt"
    if not os.path.exists(resume):
        raise UsageError(f"-r/--resume: '{resume}' does not exist; expected {expected}")
    if os.path.isfile(resume):
        ckpt = resume
        parent = os.path.dirname(os.path.abspath(resume))
        while os.path.basename(parent) != "checkpoints":  # also checkpoints/trainstep_checkpoints/<file>
            if os.path.dirname(parent) == parent:
                raise UsageError(f"-r/--resume: checkpoint '{resume}' is not inside a run's checkpoints/ directory; "
                                 f"expected {expected} (to start a new run from it use model.params.ckpt_path)")
            parent = os.path.dirname(parent)
        logdir = os.path.dirname(parent)
    else:
        logdir = os.path.normpath(resume)
        ckpt = os.path.join(logdir, "checkpoints", "last.ckpt")
        if not os.path.isfile(ckpt):
            raise UsageError(f"-r/--resume: run directory '{resume}' has no checkpoints/last.ckpt to resume from")
    saved = sorted(glob.glob(os.path.join(logdir, "configs", "*.yaml")))
    remove_stale_temp_files(os.path.join(logdir, "checkpoints"))
    return RunDir(logdir=logdir, now=now, resume_ckpt=ckpt, saved_configs=saved)


def remove_stale_temp_files(ckptdir: str) -> None:
    """Delete the hidden `.<name>.<pid>.<id>.tmp` files a killed writer left (see `ldm.util.atomic_path`)."""
    for path in glob.glob(os.path.join(ckptdir, "**", ".*.tmp"), recursive=True):
        logger.info("removing %s, left by an interrupted checkpoint write", path)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def split_base_and_overrides(base: Sequence[str], unknown: Sequence[str]) -> tuple[list[str], list[str]]:
    """Config files and dotlist overrides: `-b a.yaml x.y=1` gives x.y=1 to the overrides (-b takes many)."""
    files, dotlist = [], []
    for item in base:
        (dotlist if "=" in item and not os.path.exists(item) else files).append(item)
    for item in unknown:
        if item.startswith("-") or "=" not in item:
            raise UsageError(f"unrecognised argument '{item}': expected a flag listed by --help or a config override "
                             "key=value (e.g. model.params.base_learning_rate=1e-5)")
    return files, dotlist + list(unknown)


def load_config(files: Sequence[str], dotlist: Sequence[str]) -> tuple[DictConfig, DictConfig]:
    """Merge the config files left to right and the dotlist over them; split off the `lightning` section."""
    configs = []
    for path in files:
        if not os.path.isfile(path):
            raise UsageError(f"-b/--base: config file '{path}' does not exist")
        try:
            loaded = OmegaConf.load(path)
        except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as err:
            raise UsageError(f"config file '{path}' is not valid YAML: {_first_line(err)}") from err
        if not isinstance(loaded, DictConfig):
            raise UsageError(f"config file '{path}' must hold a mapping (model:, data:, lightning:) at the top level")
        configs.append(loaded)
    try:
        overrides = OmegaConf.from_dotlist(list(dotlist))
        config = OmegaConf.merge(*configs, overrides)
    except (OmegaConfBaseException, ValueError) as err:
        raise UsageError(f"config overrides {' '.join(dotlist)}: {_first_line(err)}") from err
    if not isinstance(config.get("model"), DictConfig):
        sources = " ".join(files) or "(no -b files)"
        raise UsageError(f"the merged config from {sources} has no 'model' section; "
                         "expected model: {target: ..., params: ...}")
    lightning = config.pop("lightning", None)
    return config, lightning if isinstance(lightning, DictConfig) else OmegaConf.create()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def parse_gpus(gpus: Any) -> tuple[str, Any]:
    """The Lightning 1 `gpus` value as (accelerator, devices): '0,' -> ('gpu', [0]), '0,1' -> ('gpu', [0, 1]),
    2 -> ('gpu', 2), -1 -> ('gpu', -1) (all), 0 -> ('cpu', 1)."""
    text = str(gpus).strip()
    try:
        if "," in text:
            ids = [int(part) for part in text.split(",") if part.strip()]
            return ("gpu", ids) if ids else ("cpu", 1)
        count = int(text)
    except ValueError as err:
        raise UsageError(f"--gpus / lightning.trainer.gpus: expected GPU ids like '0,' or '0,1' or a count, "
                         f"got {gpus!r}") from err
    return ("cpu", 1) if count == 0 else ("gpu", count)


def trainer_options(trainer_cfg: Any, flags: Mapping[str, Any], gpus: Any = None) -> dict[str, Any]:
    """The Trainer's keyword arguments: `lightning.trainer` with the command-line flags over it, Lightning 1
    spellings (gpus, accelerator: ddp, replace_sampler_ddp) translated, every key checked against Trainer."""
    import lightning.pytorch as pl
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    options = OmegaConf.to_container(trainer_cfg, resolve=True) if trainer_cfg is not None else {}
    if not isinstance(options, dict):
        raise UsageError(f"lightning.trainer must be a mapping of Trainer arguments, got {options!r}")
    options.update({key: value for key, value in flags.items() if value is not None})
    accelerator = options.get("accelerator")
    if isinstance(accelerator, str) and accelerator not in AcceleratorRegistry and accelerator in StrategyRegistry:
        logger.warning("lightning.trainer.accelerator=%s is a strategy in Lightning 2; using strategy=%s",
                       accelerator, accelerator)
        options.setdefault("strategy", options.pop("accelerator"))
    gpus = options.pop("gpus", None) if gpus is None else gpus
    options.pop("gpus", None)
    if gpus is not None:
        if flags.get("accelerator") is not None or flags.get("devices") is not None:
            raise UsageError("--gpus cannot be combined with --accelerator/--devices; use one or the other")
        options["accelerator"], options["devices"] = parse_gpus(gpus)
    if "replace_sampler_ddp" in options:
        logger.warning("lightning.trainer.replace_sampler_ddp is called use_distributed_sampler in Lightning 2")
        options.setdefault("use_distributed_sampler", options.pop("replace_sampler_ddp"))
    accepted = [p for p in inspect.signature(pl.Trainer.__init__).parameters if p != "self"]
    for key in options:
        if key in RESERVED_TRAINER_KEYS:
            raise UsageError(f"lightning.trainer.{key} is set by main.py; use {RESERVED_TRAINER_KEYS[key]} instead")
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UsageError(f"lightning.trainer.{key} is not an argument of lightning.pytorch.Trainer{hint}")
    return options


def drop_manual_optimization_options(options: dict[str, Any], model: Any) -> list[str]:
    """Remove the Trainer options Lightning rejects for a manually optimising module, with a warning each.

    A module that accumulates gradients itself (an `accumulate_grad_batches` attribute, as the autoencoders) is
    handed accumulate_grad_batches instead of losing it.
    """
    if getattr(model, "automatic_optimization", True):
        return []
    dropped = []
    for key in MANUAL_OPTIMIZATION_UNSUPPORTED:
        if key not in options:
            continue
        value = options.pop(key)
        dropped.append(key)
        if key == "accumulate_grad_batches" and hasattr(model, key):
            setattr(model, key, 1 if value is None else value)
            logger.info("%s accumulates gradients over %s batches itself", type(model).__name__, value)
            continue
        harmless = (None, 1) if key == "accumulate_grad_batches" else (None, 0)
        if key != "gradient_clip_algorithm" and value not in harmless:
            logger.warning("ignoring lightning.trainer.%s=%s: %s optimises manually (automatic_optimization=False), "
                           "which Lightning does not combine with it", key, value, type(model).__name__)
    return dropped


def learning_rate(config: DictConfig, accumulate: int, devices: int, nodes: int, scale: bool) -> tuple[float, str]:
    """model.learning_rate and the sentence that explains it: accumulate x devices x nodes x batch x base_lr,
    or base_lr unscaled."""
    base_lr = OmegaConf.select(config, "model.base_learning_rate")
    if base_lr is None:
        raise UsageError("config key model.base_learning_rate is missing; training needs a learning rate")
    base_lr = float(base_lr)
    if not scale:
        return base_lr, f"++++ NOT USING LR SCALING ++++ Setting learning rate to {base_lr:.2e}"
    batch = OmegaConf.select(config, "data.params.batch_size")
    if batch is None:
        raise UsageError("config key data.params.batch_size is missing; the learning rate is scaled by it "
                         "(pass --scale_lr False to use model.base_learning_rate as it is)")
    lr = accumulate * devices * nodes * int(batch) * base_lr
    return lr, (f"Setting learning rate to {lr:.2e} = {accumulate} (accumulate_grad_batches) * {devices} "
                f"(num_devices) * {nodes} (num_nodes) * {int(batch)} (batchsize) * {base_lr:.2e} (base_lr)")
