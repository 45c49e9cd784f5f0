"""From main.py's flags to a run: where it lives, its merged config, its Trainer options and learning rate.

Everything here raises `UsageError` (one line, naming the flag, file or config key) for a user mistake.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import glob
import inspect
import logging
import os
import shutil
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.errors import UserError
from ldm.util import first_line

logger = logging.getLogger(__name__)

# rank 0 of a run launched by Lightning's subprocess launcher tells its children where the run lives
LOGDIR_ENV = "LDM_MAIN_LOGDIR"

# Trainer arguments main.py sets itself; the config cannot
RESERVED_TRAINER_KEYS = {"logger": "lightning.logger", "callbacks": "lightning.callbacks",
                         "default_root_dir": "-l/--logdir"}
# Trainer arguments Lightning refuses for LightningModules that optimise manually
MANUAL_OPTIMIZATION_UNSUPPORTED = ("accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm")
TRUE_WORDS, FALSE_WORDS = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")
# Lightning 1's Trainer argument for starting from a checkpoint's training state (fit's ckpt_path in Lightning 2)
RESUME_FROM_CHECKPOINT = "resume_from_checkpoint"
# Trainer arguments that take objects, not command-line text (set them in lightning.trainer)
OBJECT_TRAINER_KEYS = ("plugins",)
# the `lightning:` sections main.py reads, and what each holds
LIGHTNING_KEYS = {
    "trainer": "Trainer arguments",
    "logger": "the logger's target/params",
    "modelcheckpoint": "ModelCheckpoint params (or target/params)",
    "callbacks": "named callbacks' target/params",
    "strategy": "the strategy's target/params (generative-models' main.py)",
    "find_unused_parameters": "DDP's find_unused_parameters (SD 2's inpainting config)",
    "nan_guard": "NaNGuard params, or null to turn it off",
    "random_state": "false turns off saving the random state in checkpoints",
    "speed": "compile / channels_last switches (main.py --compile / --channels_last)",
}


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


@dataclass(frozen=True)
class TrainerFlag:
    """A `--<name>` flag for one Trainer argument; `kinds` are the types its annotation (or default) allows
    and `choices` its Literal values, if any. `parse` turns the command-line text into the first allowed value."""

    name: str
    kinds: tuple[type, ...]
    choices: tuple[Any, ...] = ()

    @property
    def takes_bool(self) -> bool:
        return bool in self.kinds or any(isinstance(c, bool) for c in self.choices)

    @property
    def bool_only(self) -> bool:
        return self.takes_bool and not [k for k in self.kinds if k is not bool] and \
            all(isinstance(c, bool) for c in self.choices)

    def _allowed(self, value: Any) -> bool:
        if self.choices and value in self.choices and type(value) in {type(c) for c in self.choices}:
            return True
        kind = type(value)
        return kind in self.kinds or (kind is int and float in self.kinds)

    def parse(self, text: str) -> Any:
        """'2' -> 2, '0.5' -> 0.5, 'true' -> True, '[0, 1]' -> [0, 1], else the text, as the annotation allows."""
        candidates: list[Any] = []
        for convert in (int, float):
            with contextlib.suppress(ValueError):
                candidates.append(convert(text))
        if text.lower() in TRUE_WORDS + FALSE_WORDS and not text.isdigit():
            candidates.insert(0, str2bool(text))
        elif text in ("0", "1") and self.bool_only:
            candidates.insert(0, text == "1")
        if text[:1] in "[{":
            with contextlib.suppress(yaml.YAMLError):
                candidates.append(yaml.safe_load(text))
        candidates.append(text)
        for value in candidates:
            if self._allowed(value):
                return value
        expected = ", ".join([k.__name__ for k in self.kinds] + [repr(c) for c in self.choices])
        raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")


def _annotation_kinds(annotation: Any) -> tuple[set[type], list[Any]]:
    """The plain types (bool, int, float, str, list, dict) and Literal values an annotation allows."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return set(), list(typing.get_args(annotation))
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        kinds: set[type] = set()
        choices: list[Any] = []
        for arg in typing.get_args(annotation):
            more, values = _annotation_kinds(arg)
            kinds |= more
            choices += values
        return kinds, choices
    plain = origin or annotation
    return ({plain} if plain in (bool, int, float, str, list, dict) else set()), []


def trainer_flags() -> dict[str, TrainerFlag]:
    """One flag per argument of `pytorch_lightning.Trainer.__init__` that takes command-line values, typed from
    its annotation (from its default where it has none), as Lightning 1's `Trainer.add_argparse_args` did."""
    import pytorch_lightning as pl

    hints = typing.get_type_hints(pl.Trainer.__init__)
    flags = {}
    for name, param in inspect.signature(pl.Trainer.__init__).parameters.items():
        if name == "self" or name in RESERVED_TRAINER_KEYS or name in OBJECT_TRAINER_KEYS:
            continue
        annotation = hints.get(name, inspect.Parameter.empty)
        if annotation is inspect.Parameter.empty:
            kinds, choices = ({type(param.default)} if param.default not in (None, inspect.Parameter.empty)
                              else {str}), []
        else:
            kinds, choices = _annotation_kinds(annotation)
        if kinds or choices:
            flags[name] = TrainerFlag(name, tuple(sorted(kinds, key=lambda k: k.__name__)), tuple(choices))
    return flags


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
                             "to start a new run from a checkpoint use -n with --resume_from_checkpoint <file> (its "
                             "training state) or model.params.ckpt_path=<file> (its weights)")
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
    if os.path.isfile(resume) or is_sharded_checkpoint(resume):
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
        remove_stale_temp_files(os.path.join(logdir, "checkpoints"))  # may put back a set-aside last.ckpt
        if not (os.path.isfile(ckpt) or is_sharded_checkpoint(ckpt)):
            raise UsageError(f"-r/--resume: run directory '{resume}' has no checkpoints/last.ckpt to resume from")
    saved = sorted(glob.glob(os.path.join(logdir, "configs", "*.yaml")))
    remove_stale_temp_files(os.path.join(logdir, "checkpoints"))
    return RunDir(logdir=logdir, now=now, resume_ckpt=ckpt, saved_configs=saved)


def is_sharded_checkpoint(path: str) -> bool:
    """Whether `path` is a sharded (distributed) checkpoint: a folder with Lightning's meta.pt."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "meta.pt"))


def remove_stale_temp_files(ckptdir: str) -> None:
    """Delete the hidden `.<name>.<pid>.<id>.tmp` files (or sharded-checkpoint folders) a killed writer left (see
    `ldm.util.atomic_path`); a `.<name>.<id>.prev` that a kill left while swapping in a sharded checkpoint goes back
    to `<name>` when that is missing."""
    for path in glob.glob(os.path.join(ckptdir, "**", ".*.prev"), recursive=True):
        original = os.path.join(os.path.dirname(path), os.path.basename(path)[1:].rsplit(".", 2)[0])
        if not os.path.exists(original):
            logger.info("putting back %s as %s (a checkpoint swap was interrupted)", path, original)
            os.replace(path, original)
    for path in glob.glob(os.path.join(ckptdir, "**", ".*.tmp"), recursive=True) + \
            glob.glob(os.path.join(ckptdir, "**", ".*.prev"), recursive=True):
        logger.info("removing %s, left by an interrupted checkpoint write", path)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


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


def parse_overrides(dotlist: Sequence[str]) -> DictConfig:
    """The `key=value` overrides as one config; a malformed one (empty key part, value that is not YAML, e.g.
    `model.params=[1,`) is a UsageError naming it."""
    for item in dotlist:
        key, _, value = item.partition("=")
        if not all(key.split(".")):
            raise UsageError(f"config override '{item}': the key '{key}' has an empty part; expected "
                             "dotted.key=value (e.g. model.params.base_learning_rate=1e-5)")
        try:
            OmegaConf.from_dotlist([item])
        except (yaml.YAMLError, OmegaConfBaseException, ValueError) as err:
            problem = getattr(err, "problem", None) or first_line(err)
            raise UsageError(f"config override '{item}': the value '{value}' is not valid YAML ({problem}); "
                             "expected a YAML value such as 1e-5, [1, 2] or {a: 1}; quote a string that YAML would read "
                             "otherwise, e.g. key='{0..9}.tar'")
    return OmegaConf.from_dotlist(list(dotlist))


def load_config(files: Sequence[str], dotlist: Sequence[str]) -> tuple[DictConfig, DictConfig]:
    """Merge the config files left to right and the dotlist over them; split off the `lightning` section."""
    configs = []
    for path in files:
        if not os.path.isfile(path):
            raise UsageError(f"-b/--base: config file '{path}' does not exist")
        try:
            loaded = OmegaConf.load(path)
        except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as err:
            raise UsageError(f"config file '{path}' is not valid YAML: {first_line(err)}") from err
        if not isinstance(loaded, DictConfig):
            raise UsageError(f"config file '{path}' must hold a mapping (model:, data:, lightning:) at the top level")
        configs.append(loaded)
    overrides = parse_overrides(dotlist)
    try:
        config = OmegaConf.merge(*configs, overrides)
    except (OmegaConfBaseException, ValueError, TypeError, yaml.YAMLError) as err:  # e.g. an unquoted {0..9}.tar
        raise UsageError(f"config overrides {' '.join(dotlist)}: {first_line(err)} (quote values that YAML "
                         "would read as a mapping or list, e.g. key='{0..9}.tar')") from err
    if not isinstance(config.get("model"), DictConfig):
        sources = " ".join(files) or "(no -b files)"
        raise UsageError(f"the merged config from {sources} has no 'model' section; "
                         "expected model: {target: ..., params: ...}")
    lightning = config.pop("lightning", None)
    lightning = lightning if isinstance(lightning, DictConfig) else OmegaConf.create()
    for key in lightning:
        if key not in LIGHTNING_KEYS:
            close = difflib.get_close_matches(str(key), list(LIGHTNING_KEYS), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UsageError(f"lightning.{key} is not a section main.py reads; {hint}known: "
                             + ", ".join(f"{name} ({what})" for name, what in LIGHTNING_KEYS.items()))
    return config, lightning


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
    import pytorch_lightning as pl
    from pytorch_lightning.accelerators import AcceleratorRegistry
    from pytorch_lightning.strategies import StrategyRegistry

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
    accepted.append(RESUME_FROM_CHECKPOINT)  # Lightning 1's; main.py hands it to fit (start_from_checkpoint)
    for key in options:
        if key in RESERVED_TRAINER_KEYS:
            raise UsageError(f"lightning.trainer.{key} is set by main.py; use {RESERVED_TRAINER_KEYS[key]} instead")
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UsageError(f"lightning.trainer.{key} is not an argument of pytorch_lightning.Trainer{hint}")
    return options


def start_from_checkpoint(options: dict[str, Any], run: RunDir) -> None:
    """Lightning 1's `resume_from_checkpoint` (--flag or lightning.trainer key; the original main.py pairs it with
    -n): this new run starts from that checkpoint's whole training state (weights, optimizers, step), as
    Lightning 2's `fit(ckpt_path=...)` does; the option itself leaves the Trainer's arguments."""
    path = options.pop(RESUME_FROM_CHECKPOINT, None)
    if not path:
        return
    if run.resume_ckpt:
        raise UsageError("--resume_from_checkpoint / lightning.trainer.resume_from_checkpoint cannot be combined with "
                         "-r/--resume, which continues a run from its own checkpoint")
    if not os.path.isfile(path):
        raise UsageError(f"--resume_from_checkpoint: checkpoint '{path}' does not exist")
    logger.info("starting run %s from the training state in %s", run.logdir, path)
    run.resume_ckpt = str(path)


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
