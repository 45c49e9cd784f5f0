"""Train (and test) a model described by YAML configs: flags -> merged OmegaConf -> objects -> Lightning run.

    python main.py --base configs/latent-diffusion/cin-ldm-vq-f8.yaml -t --gpus 0, model.params.base_learning_rate=1e-5
    python main.py --resume logs/<run>                       # continue a run in its own directory

Runs live in `<logdir>/<timestamp>_<name><postfix>/` with configs/, checkpoints/ and images/.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import signal
import sys
from typing import Any

from omegaconf import DictConfig
from pytorch_lightning import LightningModule, Trainer, seed_everything
from pytorch_lightning.callbacks import LearningRateMonitor  # noqa: F401 - original config target main.*
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.model_helpers import is_overridden
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from ldm.acceleration import accelerate, warn_if_emulated_bf16
from ldm.errors import UserError
from ldm.training.callbacks import EmergencyCheckpoint, ImageLogger, SetupCallback  # noqa: F401 - config targets
from ldm.training.checkpoint_io import CheckpointWriteError
from ldm.training.config import (LOGDIR_ENV, RESUME_FROM_CHECKPOINT, RunDir, UsageError,
                                 drop_manual_optimization_options, learning_rate, load_config, resolve_run,
                                 split_base_and_overrides, start_from_checkpoint, str2bool, trainer_flags,
                                 trainer_options)
from ldm.training.data import DataModuleFromConfig, WrappedDataset, worker_init_fn  # noqa: F401 - config targets
from ldm.training.fault_tolerance import NonFiniteError
from ldm.training.trainer import build_trainer, speed_options
from ldm.util import instantiate_from_config

logger = logging.getLogger("main")

# exit codes besides 0 (done), 1 (crash, or a checkpoint that could not be written) and 2 (user error)
EXIT_NON_FINITE = 3  # the NaN guard stopped training (lightning.nan_guard.max_consecutive bad steps in a row)
EXIT_TERMINATED = 143  # SIGTERM: last.ckpt written, training stopped cleanly; requeue and resume with -r
USER_ERRORS = (UserError,)  # every user mistake (UsageError, ConfigError, CheckpointError, ...) derives from it
BOOL_FLAGS = {"-t": "--train", "--train": "--train", "--no-test": "--no-test", "-d": "--debug",
              "--debug": "--debug", "--scale_lr": "--scale_lr"}
BOOL_WORDS = {"yes", "true", "t", "y", "1", "no", "false", "f", "n", "0"}
TRAINER_FLAGS = trainer_flags()  # every argument of pytorch_lightning.Trainer that takes a command-line value


def get_parser() -> argparse.ArgumentParser:
    """The original main.py flags plus one flag per Trainer argument; unknown `key=value` args override the config."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    add = parser.add_argument
    add("-n", "--name", type=str, const="", default="", nargs="?", help="postfix for the run directory")
    add("-r", "--resume", type=str, const="", default="", nargs="?",
        help="resume from a run directory logs/<run> or a checkpoint logs/<run>/checkpoints/<file>.ckpt")
    add("-b", "--base", nargs="*", metavar="base_config.yaml", default=[],
        help="config files, merged left to right; key=value args after them override single keys")
    add("-t", "--train", type=str2bool, const=True, default=False, nargs="?", help="train")
    add("--no-test", type=str2bool, const=True, default=False, nargs="?", help="do not test after training")
    add("-p", "--project", help="project name, passed to loggers that take one (e.g. WandbLogger)")
    add("-d", "--debug", type=str2bool, nargs="?", const=True, default=False,
        help="debug run: lives under <logdir>/debug_runs, DEBUG logging, post-mortem debugger on a crash")
    add("-s", "--seed", type=int, default=23, help="seed for seed_everything")
    add("-f", "--postfix", type=str, default="", help="post-postfix for the default name")
    add("-l", "--logdir", type=str, default="logs", help="directory for logging data")
    add("--scale_lr", type=str2bool, nargs="?", const=True, default=True,
        help="scale base_lr by accumulate_grad_batches * devices * nodes * batch_size")
    add("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile the UNet (inductor, cached on disk); default: lightning.speed.compile, else off")
    add("--channels_last", action=argparse.BooleanOptionalAction, default=None,
        help="UNet in channels_last memory format; default: lightning.speed.channels_last, else off")
    trainer = parser.add_argument_group("pytorch_lightning.Trainer arguments (over lightning.trainer in the config)")
    trainer.add_argument("--gpus", type=str, default=None, help="Lightning 1 style GPU ids: '0,' or '0,1' or a count")
    trainer.add_argument(f"--{RESUME_FROM_CHECKPOINT}", type=str, default=None, metavar="CKPT",
                         help="Lightning 1's Trainer argument: start this (new, -n) run from a checkpoint's training "
                              "state")
    for name, flag in TRAINER_FLAGS.items():
        allowed = "/".join([kind.__name__ for kind in flag.kinds] + [repr(c) for c in flag.choices])
        trainer.add_argument(f"--{name}", type=flag.parse, default=None, metavar=name.upper(),
                             nargs="?" if flag.takes_bool else None, const=True if flag.takes_bool else None,
                             help=f"Trainer({name}=...): {allowed}")
    return parser


def explicit_bool_flags(argv: list[str]) -> list[str]:
    """`-t model.x=1` must not read `model.x=1` as -t's value: write flags that may stand alone (-t, --benchmark,
    --fast_dev_run) as `--flag=<value>`, taking the next token as the value only when it is one."""
    trainer_bools = {f"--{name}": flag for name, flag in TRAINER_FLAGS.items() if flag.takes_bool}
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        following = argv[i + 1] if i + 1 < len(argv) else None
        if token in BOOL_FLAGS or token in trainer_bools:
            flag = trainer_bools.get(token)
            if following is None:
                explicit = False
            elif flag is None or flag.bool_only:
                explicit = following.lower() in BOOL_WORDS
            else:  # e.g. --fast_dev_run 5 or --deterministic warn
                explicit = not following.startswith("-") and "=" not in following
            out.append(f"{BOOL_FLAGS.get(token, token)}={following if explicit else 'true'}")
            i += 2 if explicit else 1
        else:
            out.append(token)
            i += 1
    return out


def _configure_logging(debug: bool) -> None:
    """INFO on rank 0 (DEBUG with -d), warnings only on the other processes."""
    level = (logging.DEBUG if debug else logging.INFO) if rank_zero_only.rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)


def prepare(opt: argparse.Namespace, unknown: list[str], now: str
            ) -> tuple[RunDir, LightningModule, Any, Trainer, EmergencyCheckpoint]:
    """Everything before the run starts; raises UsageError/ConfigError for user mistakes, writes nothing."""
    files, dotlist = split_base_and_overrides(opt.base, unknown)
    run = resolve_run(now, opt.name, opt.resume, files, opt.logdir, opt.postfix, opt.debug,
                      rank_zero=rank_zero_only.rank == 0)
    if not run.saved_configs and not files:
        raise UsageError("no config: pass -b/--base config.yaml (or -r/--resume a run directory with configs/)")
    config, lightning_config = load_config(run.saved_configs + files, dotlist)
    seed_everything(opt.seed, workers=True)
    flags = {key: getattr(opt, key) for key in [*TRAINER_FLAGS, RESUME_FROM_CHECKPOINT]}
    options = trainer_options(lightning_config.get("trainer"), flags, opt.gpus)
    start_from_checkpoint(options, run)
    needs_data = opt.train or not opt.no_test
    if needs_data and not isinstance(config.get("data"), DictConfig):
        raise UsageError("the merged config has no 'data' section; expected data: {target: "
                         "main.DataModuleFromConfig, params: {batch_size: ..., train: ..., validation: ...}}")
    model = instantiate_from_config(config.model, path="model")
    accelerate(model, **speed_options(lightning_config, {"compile": opt.compile, "channels_last": opt.channels_last}))
    drop_manual_optimization_options(options, model)
    lightning_config.trainer = options
    data = instantiate_from_config(config.data, path="data") if needs_data else None
    emergency = EmergencyCheckpoint(os.path.join(run.ckptdir, "last.ckpt"), handle_sigterm=True)
    trainer = build_trainer(options, lightning_config, run, model, config, emergency, opt.project)
    if "bf16" in str(trainer.precision):
        warn_if_emulated_bf16(trainer.strategy.root_device)
    if opt.train:
        accumulate = getattr(model, "accumulate_grad_batches", 1) if not model.automatic_optimization \
            else trainer.accumulate_grad_batches
        model.learning_rate, rule = learning_rate(config, accumulate, trainer.num_devices, trainer.num_nodes,
                                                  opt.scale_lr)
        logger.info(rule)
    return run, model, data, trainer, emergency


def run_stages(opt: argparse.Namespace, run: RunDir, model: LightningModule, data: Any, trainer: Trainer) -> None:
    """fit (from the resumed checkpoint), then test when there is a test set and the model has test_step."""
    if opt.train:
        trainer.fit(model, data, ckpt_path=run.resume_ckpt)
    if opt.no_test or trainer.interrupted:
        return
    if data is None or not is_overridden("test_dataloader", data) or not is_overridden("test_step", model):
        logger.info("no test: the data has no test set or %s has no test_step", type(model).__name__)
        return
    trainer.test(model, data, ckpt_path=None if opt.train else run.resume_ckpt)


def main(argv: list[str] | None = None, configure_logging: bool = False) -> int:
    """Parse flags, build the run and execute it; user mistakes print one line and return 2."""
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    parser = get_parser()
    opt, unknown = parser.parse_known_args(explicit_bool_flags(list(sys.argv[1:] if argv is None else argv)))
    if configure_logging:
        _configure_logging(opt.debug)
    try:
        run, model, data, trainer, emergency = prepare(opt, unknown, now)
    except USER_ERRORS as err:
        print(f"main.py: error: {err}", file=sys.stderr)
        return 2
    inherited = os.environ.get(LOGDIR_ENV)
    os.environ[LOGDIR_ENV] = run.logdir  # Lightning's launcher starts the other ranks with this environment
    previous = signal.signal(signal.SIGUSR1, emergency.request)
    previous_term = signal.signal(signal.SIGTERM, emergency.request_stop)
    try:
        run_stages(opt, run, model, data, trainer)
    except USER_ERRORS as err:
        print(f"main.py: error: {err}", file=sys.stderr)
        return 2
    except (NonFiniteError, CheckpointWriteError) as err:
        print(f"main.py: error: {err}", file=sys.stderr)
        return EXIT_NON_FINITE if isinstance(err, NonFiniteError) else 1
    except SIGTERMException:  # SIGTERM before training started (Lightning's handler): nothing to save yet
        print("main.py: stopped by SIGTERM before training started; run the same command again", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception:
        if opt.debug and trainer.global_rank == 0 and sys.stdin.isatty():
            import pdb

            pdb.post_mortem(sys.exc_info()[2])
        raise
    finally:
        signal.signal(signal.SIGUSR1, previous)
        signal.signal(signal.SIGTERM, previous_term)
        if inherited is None:
            os.environ.pop(LOGDIR_ENV, None)
        else:
            os.environ[LOGDIR_ENV] = inherited
    if emergency.stopped_by_signal:
        print(f"main.py: stopped by SIGTERM after writing {emergency.ckpt_path}; resume with "
              f"main.py -r {run.logdir}", file=sys.stderr)
        return EXIT_TERMINATED
    return 0


if __name__ == "__main__":
    sys.exit(main(configure_logging=True))
