"""main.py end to end on a tiny pixel-space DDPM (8x8 images, 20 timesteps): the run directory, config merging,
learning-rate scaling, resume, signals, crashes, atomic checkpoints, user errors and two-process DDP.

Runs are subprocesses (`python main.py ...`) with tests/main on PYTHONPATH for the test-only dataset and callbacks
(tests/main/main_run_helpers.py); error cases and unit checks call main.main() and the helpers in-process.
"""
import csv
import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
HELPERS = REPO / "tests" / "main"
MAIN = REPO / "main.py"
sys.path.insert(0, str(REPO / "tests" / "reliability"))
import run_helpers  # noqa: E402

IMAGE_NAME = re.compile(r"^[a-z_]+_gs-\d{6}_e-\d{6}_b-\d{6}\.png$")
LR_RULE = ("Setting learning rate to {lr:.2e} = 1 (accumulate_grad_batches) * {devices} (num_devices) * 1 (num_nodes)"
           " * 2 (batchsize) * 1.00e-04 (base_lr)")


def tiny_config(out_dir, **recorder):
    """DDPM on 8x8 images with a 2-level 32-channel UNet, batch 2, 8 training / 4 validation images."""
    images = "main_run_helpers.TinyImages"
    return {
        "model": {
            "base_learning_rate": 1.0e-4,
            "target": "ldm.models.diffusion.ddpm.DDPM",
            "params": {
                "timesteps": 20, "image_size": 8, "channels": 3, "log_every_t": 5, "monitor": "val/loss",
                "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                "params": {"image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32,
                                           "attention_resolutions": [], "num_res_blocks": 1, "channel_mult": [1, 2],
                                           "num_heads": 4}},
            },
        },
        "data": {"target": "main.DataModuleFromConfig",
                 "params": {"batch_size": 2, "num_workers": 0,
                            "train": {"target": images, "params": {"size": 8, "length": 8}},
                            "validation": {"target": images, "params": {"size": 8, "length": 4, "seed": 1}}}},
        "lightning": {
            "callbacks": {
                "image_logger": {"target": "main.ImageLogger",
                                 "params": {"batch_frequency": 2, "max_images": 2, "increase_log_steps": False}},
                "recorder": {"target": "main_run_helpers.Recorder",
                             "params": {"out_dir": str(out_dir), "attrs": ["log_every_t"], **recorder}},
            },
            "modelcheckpoint": {"params": {"filename": "{epoch:06}-best"}},
            "trainer": {"log_every_n_steps": 1, "enable_model_summary": False, "num_sanity_val_steps": 0,
                        "benchmark": True},
        },
    }


def long_run_config(tmp_path):
    """The tiny config slowed to ~20 steps/s, with an epoch (and so the epoch-end checkpoint) far away."""
    config = tiny_config(tmp_path / "rec", sleep=0.05)
    config["data"]["params"]["train"]["params"]["length"] = 4000
    config["lightning"]["callbacks"]["image_logger"]["params"]["batch_frequency"] = 1000
    return config


def write_config(tmp_path, config=None, name="tiny.yaml"):
    path = tmp_path / name
    OmegaConf.save(OmegaConf.create(config or tiny_config(tmp_path / "rec")), path)
    return path


def _pythonpath():
    """tests/main (this file's config targets) and the repository on PYTHONPATH, before what it had."""
    return {"PYTHONPATH": os.pathsep.join([str(HELPERS), str(REPO), os.environ.get("PYTHONPATH", "")])}


def _env():
    return run_helpers.main_env(**_pythonpath())


def run_main(tmp_path, *args, timeout=300):
    """`python main.py -l logs <args>` in tmp_path; the CompletedProcess (stdout and stderr in .output)."""
    return run_helpers.run_main(tmp_path, *args, timeout=timeout, env=_pythonpath())


def start_main(tmp_path, *args):
    """main.py in the background (SIGINT raising KeyboardInterrupt even if this process ignores it)."""
    log = open(tmp_path / "main.out", "w")
    return subprocess.Popen([sys.executable, str(MAIN), "-l", "logs", *args], cwd=tmp_path, env=_env(),
                            stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(predicate, proc, timeout=120, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        assert proc.poll() is None, f"main.py exited with {proc.returncode} while waiting for {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def ckpt_step(path):
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def run_dirs(tmp_path):
    logs = tmp_path / "logs"
    return sorted(p for p in logs.iterdir()) if logs.exists() else []


def csv_rows(run):
    with open(run / "csv" / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def assert_ok(proc):
    assert proc.returncode == 0, proc.output[-4000:]


# ---------------------------------------------------------------------------------------------- full runs
@pytest.mark.slow
def test_train_writes_the_run_directory_and_resume_continues_it(tmp_path):
    config = write_config(tmp_path)
    first = run_main(tmp_path, "-b", str(config), "-t", "model.params.log_every_t=4", "--max_steps", "4")
    assert_ok(first)
    (run,) = run_dirs(tmp_path)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d_tiny", run.name)
    project = list((run / "configs").glob("*-project.yaml"))
    lightning = list((run / "configs").glob("*-lightning.yaml"))
    assert len(project) == 1 and len(lightning) == 1
    assert OmegaConf.load(project[0]).model.params.log_every_t == 4  # the dotlist override, saved
    saved_lightning = OmegaConf.load(lightning[0]).lightning
    assert saved_lightning.trainer.max_steps == 4 and saved_lightning.trainer.log_every_n_steps == 1
    # the override reached the model; the rule counts one process with batch 2
    start = read_json(tmp_path / "rec" / "rank0_start.json")
    assert start["log_every_t"] == 4
    assert start["learning_rate"] == pytest.approx(2e-4) and start["optimizer_lr"] == pytest.approx(2e-4)
    assert LR_RULE.format(lr=2e-4, devices=1) in first.output
    # lightning.modelcheckpoint merged over the defaults: its filename, the default dirpath, save_last and top-k
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 4
    assert (run / "checkpoints" / "epoch=000000-best.ckpt").is_file()
    # image grids: the original names, train at steps 2 and 4, val after the epoch; 2 images per grid (max_images)
    train_images = sorted(p.name for p in (run / "images" / "train").iterdir())
    assert all(IMAGE_NAME.match(name) for name in train_images), train_images
    assert {"inputs_gs-000002_e-000000_b-000001.png", "samples_gs-000004_e-000000_b-000003.png"} <= set(train_images)
    assert any(p.name.startswith("samples_gs-000004") for p in (run / "images" / "val").iterdir())
    from PIL import Image

    assert Image.open(run / "images" / "train" / "inputs_gs-000002_e-000000_b-000001.png").size == (22, 12)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # the scalars also go to csv/metrics.csv, with the training clock
    first_rows = csv_rows(run)
    assert {"train/loss_simple_step", "val/loss", "time/train_seconds", "step", "session"} <= set(first_rows[0])
    assert [r["step"] for r in first_rows if r["train/loss_simple_step"]] == ["0", "1", "2", "3"]
    first_times = [float(r["time/train_seconds"]) for r in first_rows if r["time/train_seconds"]]
    assert len(first_times) == 4 and first_times == sorted(first_times) and first_times[0] > 0

    second = run_main(tmp_path, "-r", str(run.relative_to(tmp_path)), "-t", "--max_steps", "6")
    assert_ok(second)
    assert run_dirs(tmp_path) == [run]  # continued in place
    assert len(list((run / "configs").glob("*.yaml"))) == 4  # a new pair per session
    start = read_json(tmp_path / "rec" / "rank0_start.json")
    # global step, optimizer state (AdamW's step count), EMA and the saved dotlist override all came back
    assert start["global_step"] == 4 and start["adam_step"] == 4 and start["ema_updates"] == 4
    assert start["log_every_t"] == 4
    assert read_json(tmp_path / "rec" / "rank0_end.json")["global_step"] == 6
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 6
    assert not list((run / "checkpoints").glob("last-v*.ckpt"))
    # the resumed session appended its rows; the clock went on from the time the checkpoint held
    rows = csv_rows(run)
    assert rows[: len(first_rows)] == first_rows and {r["session"] for r in rows[len(first_rows):]} == {"1"}
    train = [r for r in rows if r["train/loss_simple_step"]]
    assert [float(r["global_step"]) for r in train] == [0, 1, 2, 3, 4, 5]
    assert all(int(r["step"]) > 3 for r in train[4:])  # Lightning's logging step; after a resume it may skip one
    times = [float(r["time/train_seconds"]) for r in rows[len(first_rows):] if r["time/train_seconds"]]
    assert len(times) == 2 and min(times) > max(first_times)


@pytest.mark.slow
def test_sigkill_mid_training_resumes_from_the_last_periodic_checkpoint(tmp_path):
    config = long_run_config(tmp_path)
    # Lightning 2.6 defers step-based saves of a checkpoint that monitors a validation metric until validation has
    # run, so this one monitors nothing and keeps only last.ckpt, every 2 steps
    config["lightning"]["modelcheckpoint"]["params"].update(every_n_train_steps=2, monitor=None, save_top_k=0)
    path = write_config(tmp_path, config)
    proc = start_main(tmp_path, "-b", str(path), "-t", "--max_steps", "100000")
    try:
        last = wait_for(lambda: next(iter((tmp_path / "logs").glob("*/checkpoints/last.ckpt")), None), proc,
                        what="a periodic last.ckpt")
        wait_for(lambda: (read_json(tmp_path / "rec" / "rank0_progress.json") or {}).get("global_step", 0) >= 5,
                 proc, what="step 5")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    saved = ckpt_step(last)
    assert saved >= 2 and saved % 2 == 0
    run = last.parent.parent
    # a kill that lands inside a save can leave only a hidden temp file, never a partial .ckpt
    assert all(p.suffix == ".ckpt" or (p.name.startswith(".") and p.suffix == ".tmp")
               for p in (run / "checkpoints").iterdir())

    resumed = run_main(tmp_path, "-r", str(last.relative_to(tmp_path)), "-t", "--max_steps", str(saved + 2),
                       "lightning.callbacks.recorder.params.sleep=0")
    assert_ok(resumed)
    assert run_dirs(tmp_path) == [run]
    assert not [p for p in (run / "checkpoints").iterdir() if p.suffix != ".ckpt"]  # stale temp files removed
    assert read_json(tmp_path / "rec" / "rank0_start.json")["global_step"] == saved
    assert read_json(tmp_path / "rec" / "rank0_end.json")["global_step"] == saved + 2
    assert ckpt_step(last) == saved + 2
    assert not list((run / "checkpoints").glob("last-v*.ckpt"))


@pytest.mark.slow
def test_sigusr1_writes_a_checkpoint_and_ctrl_c_writes_last_ckpt(tmp_path):
    proc = start_main(tmp_path, "-b", str(write_config(tmp_path, long_run_config(tmp_path))), "-t",
                      "--max_steps", "100000")
    progress = tmp_path / "rec" / "rank0_progress.json"
    try:
        wait_for(lambda: (read_json(progress) or {}).get("global_step", 0) >= 2, proc, what="step 2")
        assert not list((tmp_path / "logs").glob("*/checkpoints/*.ckpt"))
        proc.send_signal(signal.SIGUSR1)
        last = wait_for(lambda: next(iter((tmp_path / "logs").glob("*/checkpoints/last.ckpt")), None), proc,
                        what="the SIGUSR1 checkpoint")
        first = ckpt_step(last)
        assert first >= 2
        wait_for(lambda: read_json(progress)["global_step"] >= first + 2, proc, what="training to go on")
        proc.send_signal(signal.SIGINT)
        proc.wait(180)  # generous: a loaded CI machine needs more than a minute
    finally:
        if proc.poll() is None:
            proc.kill()
    output = (tmp_path / "main.out").read_text()
    assert proc.returncode != 0, output[-3000:]
    assert "KeyboardInterrupt" in output
    assert ckpt_step(last) >= first + 2  # Ctrl-C saved the state reached, over the SIGUSR1 one
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_keeps_ranks_identical_and_scales_lr_by_both(tmp_path):
    proc = run_main(tmp_path, "-b", str(write_config(tmp_path)), "-t", "--accelerator", "cpu", "--devices", "2",
                    "--strategy", "ddp", "--max_steps", "4")
    assert_ok(proc)
    rec = tmp_path / "rec"
    starts = [read_json(rec / f"rank{r}_start.json") for r in (0, 1)]
    ends = [read_json(rec / f"rank{r}_end.json") for r in (0, 1)]
    assert all(s["world_size"] == 2 for s in starts)
    assert ends[0]["global_step"] == ends[1]["global_step"] == 4
    assert ends[0]["hash"] == ends[1]["hash"]  # identical weights and EMA on both ranks
    for start in starts:
        assert start["learning_rate"] == pytest.approx(2 * 2 * 1e-4)  # 2 processes x batch 2 x base_lr
    assert LR_RULE.format(lr=4e-4, devices=2) in proc.output
    (run,) = run_dirs(tmp_path)  # rank 1 wrote no directory of its own
    assert len(list((run / "configs").iterdir())) == 2
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 4


# ---------------------------------------------------------------------------------------------- in-process
def test_exception_inside_training_leaves_last_ckpt(tmp_path, monkeypatch, main_module):
    monkeypatch.syspath_prepend(str(HELPERS))
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path / "rec")
    config["lightning"]["callbacks"]["boom"] = {"target": "main_run_helpers.Boom", "params": {"at_step": 3}}
    config["lightning"]["trainer"]["enable_progress_bar"] = False
    path = write_config(tmp_path, config)
    handler = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(RuntimeError, match="boom at step 3"):
        main_module.main(["-b", str(path), "-t", "-l", "logs", "--max_steps", "10"])
    (run,) = run_dirs(tmp_path)
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 3
    assert signal.getsignal(signal.SIGUSR1) is handler  # main() restored what it replaced


def test_a_run_ended_by_its_step_limit_between_saves_keeps_its_final_state(tmp_path, monkeypatch, main_module):
    """last.ckpt holds the step a run stopped at (max_steps here; max_time and time budgets alike), not only the
    last validation's: validating every 3 steps, a 5-step run would otherwise lose steps 4 and 5."""
    monkeypatch.syspath_prepend(str(HELPERS))
    monkeypatch.chdir(tmp_path)
    config = long_run_config(tmp_path)
    config["lightning"]["trainer"].update(enable_progress_bar=False, val_check_interval=3, limit_val_batches=1)
    path = str(write_config(tmp_path, config))
    assert main_module.main(["-b", path, "-t", "-l", "logs", "--max_steps", "5", "--no-test"]) == 0
    (run,) = run_dirs(tmp_path)
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 5
    assert not list((run / "checkpoints").glob("last-v*.ckpt"))  # the same last.ckpt, overwritten


def test_resume_from_checkpoint_starts_a_new_run_from_the_training_state(tmp_path, monkeypatch, main_module):
    """The original main.py's advice: -n <name> with Lightning 1's --resume_from_checkpoint starts a new run directory
    from another run's checkpoint, its step and optimizer state included."""
    monkeypatch.syspath_prepend(str(HELPERS))
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path / "rec")
    config["lightning"]["trainer"]["enable_progress_bar"] = False
    path = str(write_config(tmp_path, config))
    assert main_module.main(["-b", path, "-t", "-l", "logs", "--max_steps", "2", "--no-test"]) == 0
    (first,) = run_dirs(tmp_path)
    ckpt = str(first / "checkpoints" / "last.ckpt")
    assert main_module.main(["-b", path, "-t", "-l", "logs", "-n", "again", "--resume_from_checkpoint", ckpt,
                             "--max_steps", "3", "--no-test"]) == 0
    second = [run for run in run_dirs(tmp_path) if run != first]
    assert len(second) == 1 and second[0].name.endswith("_again")
    start = read_json(tmp_path / "rec" / "rank0_start.json")
    assert start["global_step"] == 2 and start["adam_step"] == 2  # the training state came along
    assert ckpt_step(second[0] / "checkpoints" / "last.ckpt") == 3 and ckpt_step(ckpt) == 2
    saved = OmegaConf.load(next((second[0] / "configs").glob("*-lightning.yaml")))
    assert "resume_from_checkpoint" not in saved.lightning.trainer  # a later -r resumes from the run's own last.ckpt


def test_pytorch_lightning_targets_mix_with_our_trainer(tmp_path, monkeypatch, main_module):
    """A config written for the originals names pytorch_lightning.* callbacks and loggers; one written for the
    `lightning` package names lightning.pytorch.*. Both train with our Trainer, as the one checkpoint callback
    (no default one beside it) and the user's logger (the run's CSV logger stays beside it)."""
    monkeypatch.syspath_prepend(str(HELPERS))
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path / "rec")
    lightning = config["lightning"]
    lightning["logger"] = {"target": "pytorch_lightning.loggers.CSVLogger", "params": {"name": "csvrun"}}
    lightning["modelcheckpoint"] = {"target": "pytorch_lightning.callbacks.ModelCheckpoint",
                                    "params": {"filename": "{step:06}", "save_top_k": -1, "monitor": None,
                                               "every_n_train_steps": 1}}
    lightning["callbacks"]["lr"] = {"target": "lightning.pytorch.callbacks.LearningRateMonitor",
                                    "params": {"logging_interval": "step"}}
    lightning["callbacks"]["learning_rate_logger"] = None
    lightning["trainer"]["enable_progress_bar"] = False
    assert main_module.main(["-b", str(write_config(tmp_path, config)), "-t", "-l", "logs", "--max_steps", "2",
                             "--no-test"]) == 0
    (run,) = run_dirs(tmp_path)
    end = read_json(tmp_path / "rec" / "rank0_end.json")
    assert end["checkpoint_callbacks"] == ["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]
    # the user's logger, and beside it the run's csv/metrics.csv (lightning.csv_logger: null would drop it)
    assert end["loggers"] == ["pytorch_lightning.loggers.csv_logs.CSVLogger",
                              "ldm.training.csv_logger.AppendingCSVLogger"]
    assert "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor" in end["callbacks"]
    assert sorted(p.name for p in (run / "checkpoints").glob("step=*.ckpt")) == ["step=000001.ckpt", "step=000002.ckpt"]
    metrics = (run / "csvrun" / "version_0" / "metrics.csv").read_text().splitlines()
    assert "lr-AdamW" in metrics[0].split(",")  # the aliased lightning.pytorch monitor logged into our logger


def test_the_package_uses_one_lightning_namespace():
    """pytorch_lightning and lightning.pytorch are separate class hierarchies (a LightningModule of one is refused
    by the other's Trainer): the package, main.py and the scripts import only pytorch_lightning."""
    pattern = re.compile(r"^\s*(from|import)\s+lightning(\.pytorch|\.fabric)?\b", re.MULTILINE)
    files = [MAIN, *REPO.glob("ldm/**/*.py"), *REPO.glob("scripts/**/*.py"), *REPO.glob("tests/**/*.py")]
    offenders = [str(f.relative_to(REPO)) for f in files if pattern.search(f.read_text())]
    assert not offenders, offenders


def test_atomic_checkpoint_io_never_leaves_a_partial_file(tmp_path, monkeypatch):
    from ldm.training.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)
    assert torch.load(target, weights_only=True)["step"] == 1

    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, target)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, tmp_path / "ckpts" / "epoch=1.ckpt")
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no new file, no temp file
    assert torch.load(target, weights_only=True)["step"] == 1  # the previous checkpoint is intact


# a tiny KL autoencoder whose loss rejects its disc_loss (the error must name model.params.lossconfig)
BAD_LOSS_AUTOENCODER = {
    "base_learning_rate": 1.0e-4, "target": "ldm.models.autoencoder.AutoencoderKL",
    "params": {"embed_dim": 4,
               "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 8, "in_channels": 3, "out_ch": 3, "ch": 32,
                            "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
               "lossconfig": {"target": "ldm.modules.losses.LPIPSWithDiscriminator",
                              "params": {"disc_start": 1, "disc_loss": "bogus", "perceptual_weight": 0.0}}},
}


@pytest.mark.parametrize("args, message", [
    (["-b", "missing.yaml", "-t"], "-b/--base: config file 'missing.yaml' does not exist"),
    (["-b", "{nomodel}", "-t"], "has no 'model' section"),
    (["-b", "{tiny}", "-t", "lightning.trainer.max_step=3"],
     "lightning.trainer.max_step is not an argument of pytorch_lightning.Trainer; did you mean 'max_steps'?"),
    (["-r", "logs/old", "-n", "again"], "-n/--name and -r/--resume cannot be used together"),
    (["-r", "logs/nothing-here", "-t"], "-r/--resume: 'logs/nothing-here' does not exist"),
    (["-b", "{tiny}", "-t", "model.params.timesteps"], "unrecognised argument 'model.params.timesteps'"),
    (["-b", "{tiny}", "-t", "--max_stepz", "3"], "unrecognised argument '--max_stepz'"),
    (["-b", "{tiny}", "-t", "model.params.unet_config.params.in_chanels=3"], "does not accept parameter(s) in_chanels"),
    (["-b", "{tiny}", "-t", "model.base_learning_rate=null"], "config key model.base_learning_rate is missing"),
    (["-b", "{tiny}", "-t", "lightning.trainr.max_steps=3"],
     "lightning.trainr is not a section main.py reads; did you mean 'trainer'? known: trainer (Trainer arguments), "
     "logger"),
    (["-b", "{tiny}", "-t", "model.params=[1,"],
     "config override 'model.params=[1,': the value '[1,' is not valid YAML (did not find expected node content)"),
    (["-b", "{tiny}", "-t", "model..params.timesteps=3"], "config override 'model..params.timesteps=3': the key"),
    (["-b", "{ae}", "-t"], "config 'model.params.lossconfig': ldm.modules.losses.LPIPSWithDiscriminator rejected its "
                           "parameters: ValueError: lossconfig.params.disc_loss must be one of"),
    (["-b", "{tiny}", "-t", "data.params.batch_size=0"], "config 'data': main.DataModuleFromConfig rejected its "
                                                         "parameters: ValueError: data.params.batch_size must be"),
    (["-b", "{tiny}", "-t", "lightning.callbacks.image_logger.params.batch_frequency=0"],
     "config 'lightning.callbacks.image_logger': main.ImageLogger rejected its parameters: ValueError: ImageLogger "
     "batch_frequency must be a positive integer, got 0"),
    (["-b", "{tiny}", "-t", "--resume_from_checkpoint", "nowhere.ckpt"],
     "--resume_from_checkpoint: checkpoint 'nowhere.ckpt' does not exist"),
    (["-b", "{tiny}", "-t", "lightning.strategy.target=pytorch_lightning.strategies.DDPStrategy", "--strategy", "ddp"],
     "lightning.strategy and lightning.trainer.strategy / --strategy both name the strategy"),
])
def test_user_errors_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys, main_module, args, message):
    monkeypatch.syspath_prepend(str(HELPERS))
    monkeypatch.chdir(tmp_path)
    tiny = write_config(tmp_path)
    nomodel = write_config(tmp_path, {"data": {"target": "main.DataModuleFromConfig"}}, "nomodel.yaml")
    ae = write_config(tmp_path, {**tiny_config(tmp_path / "rec"), "model": BAD_LOSS_AUTOENCODER}, "ae.yaml")
    args = [a.format(tiny=tiny, nomodel=nomodel, ae=ae) for a in args]
    assert main_module.main(["-l", "logs", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "logs").exists() and not (tmp_path / "rec").exists()


def test_every_trainer_argument_is_a_flag_that_reaches_the_trainer(tmp_path, monkeypatch, main_module):
    import datetime
    import inspect

    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Timer

    generated = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self", "logger", "callbacks",
                                                                         "default_root_dir", "plugins"}
    assert set(main_module.TRAINER_FLAGS) == generated and len(generated) > 30
    monkeypatch.syspath_prepend(str(HELPERS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # --benchmark sets it
    argv = ["-b", str(write_config(tmp_path)), "-t", "-l", "logs", "--max_steps", "2", "--accumulate_grad_batches",
            "2", "--precision", "32", "--benchmark", "model.params.log_every_t=3", "--max_time", "00:00:10:00",
            "--limit_val_batches", "0.5", "--fast_dev_run", "false", "--check_val_every_n_epoch", "3"]
    opt, unknown = main_module.get_parser().parse_known_args(main_module.explicit_bool_flags(argv))
    assert unknown == ["model.params.log_every_t=3"]
    _, model, _, trainer, _ = main_module.prepare(opt, unknown, "now")
    assert trainer.max_steps == 2 and trainer.accumulate_grad_batches == 2 and trainer.precision == "32-true"
    assert trainer.limit_val_batches == 0.5 and trainer.check_val_every_n_epoch == 3 and not trainer.fast_dev_run
    assert torch.backends.cudnn.benchmark is True
    (timer,) = [c for c in trainer.callbacks if isinstance(c, Timer)]
    assert timer._duration == datetime.timedelta(minutes=10).total_seconds()
    assert model.learning_rate == pytest.approx(2 * 2 * 1e-4)  # the accumulation flag reached the lr rule too
    assert model.log_every_t == 3
    assert not (tmp_path / "logs").exists()


def test_trainer_flag_values_are_typed_from_the_signature(main_module, capsys):
    flags = main_module.TRAINER_FLAGS
    assert flags["precision"].parse("32") == 32 and flags["precision"].parse("bf16-mixed") == "bf16-mixed"
    assert flags["devices"].parse("2") == 2 and flags["devices"].parse("0,1") == "0,1"
    assert flags["devices"].parse("[0, 1]") == [0, 1]
    assert flags["val_check_interval"].parse("100") == 100 and flags["val_check_interval"].parse("0.25") == 0.25
    assert flags["gradient_clip_val"].parse("1e-3") == pytest.approx(1e-3)
    assert flags["deterministic"].parse("warn") == "warn" and flags["deterministic"].parse("true") is True
    parser = main_module.get_parser()
    opt, unknown = parser.parse_known_args(main_module.explicit_bool_flags(
        ["--benchmark", "model.x=1", "--fast_dev_run", "3", "--enable_progress_bar", "false", "--detect_anomaly"]))
    assert opt.benchmark is True and opt.fast_dev_run == 3 and opt.enable_progress_bar is False
    assert opt.detect_anomaly is True and unknown == ["model.x=1"]
    for argv, expected in ((["--precision", "17"], "argument --precision: expected "),
                           (["--max_steps", "many"], "argument --max_steps: expected int; got 'many'")):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_known_args(main_module.explicit_bool_flags(argv))
        assert exit_info.value.code == 2 and expected in capsys.readouterr().err


def test_find_unused_parameters_reaches_the_ddp_wrapper(tmp_path):
    """SD 2's inpainting config sets lightning.find_unused_parameters; it is DDP's option, whatever DDP the Trainer
    runs (an explicit ddp here), and has no effect elsewhere."""
    import pytorch_lightning as pl

    from ldm.training.trainer import apply_find_unused_parameters

    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    apply_find_unused_parameters(trainer, True)
    assert trainer.strategy._ddp_kwargs == {"find_unused_parameters": True}
    single = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    apply_find_unused_parameters(single, True)
    assert not hasattr(single.strategy, "_ddp_kwargs")


def test_lightning_strategy_section_builds_the_trainers_strategy(tmp_path, monkeypatch, main_module):
    """generative-models' lightning.strategy (target/params) is the Trainer's strategy; SD 2's
    lightning.find_unused_parameters reaches the DDP wrapper of a --strategy ddp run."""
    from pytorch_lightning.strategies import DDPStrategy

    monkeypatch.syspath_prepend(str(HELPERS))
    monkeypatch.chdir(tmp_path)
    path = str(write_config(tmp_path))
    argv = ["-b", path, "-l", "logs", "--accelerator", "cpu", "--devices", "1", "--no-test"]
    strategy = ["lightning.strategy.target=pytorch_lightning.strategies.DDPStrategy",
                "lightning.strategy.params.find_unused_parameters=true"]
    for extra, kwargs in ((strategy, {"find_unused_parameters": True}),
                          (["--strategy", "ddp", "lightning.find_unused_parameters=false"],
                           {"find_unused_parameters": False})):
        opt, unknown = main_module.get_parser().parse_known_args(main_module.explicit_bool_flags(argv + extra))
        trainer = main_module.prepare(opt, unknown, "now")[3]
        assert isinstance(trainer.strategy, DDPStrategy) and trainer.strategy._ddp_kwargs == kwargs


# ---------------------------------------------------------------------------------------------- units
def test_a_new_run_never_reuses_an_existing_directory(tmp_path):
    from ldm.training.config import resolve_run

    taken = tmp_path / "logs" / "2024-01-01T00-00-00_tiny"
    taken.mkdir(parents=True)
    run = resolve_run("2024-01-01T00-00-00", None, None, ["configs/tiny.yaml"], str(tmp_path / "logs"), "", False,
                      rank_zero=True)
    assert run.logdir == f"{taken}-1" and run.resume_ckpt is None
    debug = resolve_run("2024-01-01T00-00-00", "x", None, [], str(tmp_path / "logs"), "-v2", True, rank_zero=True)
    assert debug.logdir == str(tmp_path / "logs" / "debug_runs" / "2024-01-01T00-00-00_x-v2")


def test_resume_removes_temp_files_of_a_killed_checkpoint_write(tmp_path):
    from ldm.training.config import resolve_run

    ckpts = tmp_path / "logs" / "2024-01-01T00-00-00_tiny" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").write_bytes(b"complete")
    (ckpts / ".last.ckpt.4242.0a1b2c3d.tmp").write_bytes(b"half")
    run = resolve_run("now", None, str(ckpts.parent), [], str(tmp_path / "logs"), "", False, rank_zero=True)
    assert run.resume_ckpt == str(ckpts / "last.ckpt")
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]


def test_csv_logger_when_tensorboard_is_missing(tmp_path, monkeypatch):
    import ldm.training.trainer as trainer_module
    from ldm.training.config import RunDir

    run = RunDir(logdir=str(tmp_path / "run"), now="now")
    assert trainer_module.default_logger_config(run)["target"].endswith("TensorBoardLogger")
    monkeypatch.setattr(trainer_module, "_TENSORBOARD_AVAILABLE", False)
    assert trainer_module.default_logger_config(run) == {
        "target": "ldm.training.csv_logger.AppendingCSVLogger",
        "params": {"save_dir": run.logdir, "name": "", "version": "csv"}}


def test_bool_flags_do_not_swallow_overrides(main_module):
    parser = main_module.get_parser()
    opt, unknown = parser.parse_known_args(main_module.explicit_bool_flags(
        ["-b", "a.yaml", "-t", "model.params.x=1", "--scale_lr", "False", "-d"]))
    assert opt.train is True and opt.scale_lr is False and opt.debug is True and opt.no_test is False
    assert unknown == ["model.params.x=1"] and opt.base == ["a.yaml"]
    opt, _ = parser.parse_known_args(main_module.explicit_bool_flags(["-t", "false", "--limit_val_batches", "0.5",
                                                                      "--limit_train_batches", "3"]))
    assert opt.train is False and opt.limit_val_batches == 0.5 and opt.limit_train_batches == 3


def test_trainer_options_flags_over_config_and_lightning1_spellings():
    from ldm.training.config import UsageError, parse_gpus, trainer_options

    assert parse_gpus("0,") == ("gpu", [0]) and parse_gpus("0,1") == ("gpu", [0, 1])
    assert parse_gpus(2) == ("gpu", 2) and parse_gpus("0") == ("cpu", 1)
    cfg = OmegaConf.create({"max_steps": 10, "accumulate_grad_batches": 2, "gpus": "0,", "accelerator": "ddp"})
    opts = trainer_options(cfg, {"max_steps": 3, "devices": None})
    assert opts == {"max_steps": 3, "accumulate_grad_batches": 2, "accelerator": "gpu", "devices": [0],
                    "strategy": "ddp"}
    assert trainer_options(None, {}, gpus="0,1") == {"accelerator": "gpu", "devices": [0, 1]}
    with pytest.raises(UsageError, match="--gpus cannot be combined"):
        trainer_options(None, {"devices": 2}, gpus="0,")
    with pytest.raises(UsageError, match="lightning.trainer.logger is set by main.py"):
        trainer_options(OmegaConf.create({"logger": False}), {})


def test_manual_optimisation_drops_accumulation_and_clipping_with_a_warning(caplog):
    from ldm.training.config import drop_manual_optimization_options

    class Manual:
        automatic_optimization = False

    opts = {"accumulate_grad_batches": 2, "gradient_clip_val": 1.0, "max_steps": 5}
    with caplog.at_level(logging.WARNING):
        assert drop_manual_optimization_options(opts, Manual()) == ["accumulate_grad_batches", "gradient_clip_val"]
    assert opts == {"max_steps": 5}
    assert "lightning.trainer.accumulate_grad_batches=2" in caplog.text
    assert "lightning.trainer.gradient_clip_val=1.0" in caplog.text
    auto = {"accumulate_grad_batches": 2}
    assert drop_manual_optimization_options(auto, torch.nn.Linear(1, 1)) == [] and auto == {"accumulate_grad_batches": 2}


def test_learning_rate_rule():
    from ldm.training.config import learning_rate

    config = OmegaConf.create({"model": {"base_learning_rate": 1e-6}, "data": {"params": {"batch_size": 4}}})
    lr, rule = learning_rate(config, accumulate=2, devices=8, nodes=2, scale=True)
    assert lr == pytest.approx(2 * 8 * 2 * 4 * 1e-6)
    assert "2 (accumulate_grad_batches) * 8 (num_devices) * 2 (num_nodes) * 4 (batchsize)" in rule
    lr, rule = learning_rate(config, accumulate=2, devices=8, nodes=2, scale=False)
    assert lr == 1e-6 and "NOT USING LR SCALING" in rule


def test_image_logger_frequency():
    from ldm.training.callbacks import ImageLogger

    logger = ImageLogger(batch_frequency=8, max_images=4)
    logged = [step for step in range(0, 25) if logger.check_frequency(step)]
    assert logged == [1, 2, 4, 8, 16, 24]
    assert not logger.check_frequency(24)  # the same step again (gradient accumulation) is not logged twice
    first = ImageLogger(batch_frequency=8, max_images=4, increase_log_steps=False, log_first_step=True)
    assert [step for step in range(0, 17) if first.check_frequency(step)] == [0, 8, 16]


def test_data_module_from_config(main_module):
    sys.path.insert(0, str(HELPERS))
    try:
        data = main_module.DataModuleFromConfig(
            batch_size=3, num_workers=0, wrap=True,
            train={"target": "main_run_helpers.TinyImages", "params": {"length": 7}},
            validation={"target": "main_run_helpers.TinyImages", "params": {"length": 5}})
        data.prepare_data()
        data.setup("fit")
    finally:
        sys.path.remove(str(HELPERS))
    assert isinstance(data.datasets["train"], main_module.WrappedDataset)
    train, val = data.train_dataloader(), data.val_dataloader()
    assert isinstance(train.sampler, torch.utils.data.RandomSampler)
    assert isinstance(val.sampler, torch.utils.data.SequentialSampler)
    batch = next(iter(val))
    assert batch["image"].shape == (3, 8, 8, 3) and len(val) == 2
    from pytorch_lightning.utilities.model_helpers import is_overridden

    assert is_overridden("val_dataloader", data) and not is_overridden("test_dataloader", data)


class Painter(torch.nn.Module):
    """A module with log_images that records each call (split, step, keyword arguments, autocast state)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.global_step, self.current_epoch, self.calls = 0, 0, []

    @property
    def device(self):
        return self.weight.device

    def log_images(self, batch, split="train", N=8, **kwargs):
        self.calls.append({"split": split, "step": self.global_step, "N": N, "training": self.training,
                           "autocast": torch.is_autocast_enabled(self.device.type), **kwargs})
        return {"inputs": torch.linspace(-2, 2, 3 * 4 * 4).reshape(1, 3, 4, 4).repeat(2, 1, 1, 1)}


def test_image_logger_takes_the_originals_parameters(tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    from ldm.training.callbacks import ImageLogger

    trainer = SimpleNamespace(is_global_zero=True, default_root_dir=str(tmp_path), loggers=[], sanity_checking=False)
    module = Painter()
    logger = ImageLogger(batch_frequency=2, max_images=1, increase_log_steps=False, log_before_first_step=True,
                         log_images_kwargs={"ddim_steps": 5, "inpaint": False}, enable_autocast=False, clamp=False,
                         rescale=False)
    logger.on_train_batch_start(trainer, module, {}, 0)  # before the first step: logged, as generative-models does
    logger.on_train_batch_end(trainer, module, None, {}, 0)  # the same step 0 (accumulation) is not logged twice
    assert module.calls == [{"split": "train", "step": 0, "N": 1, "training": False, "autocast": False,
                             "ddim_steps": 5, "inpaint": False}]
    assert module.training  # back in training mode after logging
    module.global_step = 1
    logger.on_train_batch_end(trainer, module, None, {}, 1)  # not due (batch_frequency 2, no increasing steps)
    module.global_step = 2
    logger.on_train_batch_end(trainer, module, None, {}, 2)
    assert [c["step"] for c in module.calls] == [0, 2]
    grid = np.asarray(Image.open(tmp_path / "images" / "train" / "inputs_gs-000002_e-000000_b-000002.png"))
    # max_images 1 -> the first 4x4 image alone; values outside [0, 1] are cut when written (the original's uint8
    # cast wrapped them around), so the first pixel (-2) is black and the last (2) white
    assert grid.shape == (4, 4, 3) and grid[0, 0, 0] == 0 and grid[3, 3, 2] == 255
    half = torch.full((1, 3, 4, 4), 0.5)
    assert torch.allclose(ImageLogger(batch_frequency=1, max_images=1)._grid(half), torch.full((3, 4, 4), 0.75))
    assert torch.allclose(ImageLogger(1, 1, rescale=False)._grid(half), half[0])  # rescale: [-1, 1] -> [0, 1]

    off = ImageLogger(batch_frequency=1, max_images=1, disabled=True, log_first_step=True, log_before_first_step=True)
    off.on_train_batch_start(trainer, module, {}, 0)
    off.on_train_batch_end(trainer, module, None, {}, 0)
    assert len(module.calls) == 2
    # latent-diffusion's default: step 0 only with log_first_step, and only at the end of the batch
    module.global_step = 0
    default = ImageLogger(batch_frequency=4, max_images=1)
    default.on_train_batch_start(trainer, module, {}, 0)
    default.on_train_batch_end(trainer, module, None, {}, 0)
    assert len(module.calls) == 2
    first = ImageLogger(batch_frequency=4, max_images=1, log_first_step=True)
    first.on_train_batch_end(trainer, module, None, {}, 0)
    assert len(module.calls) == 3 and module.calls[-1]["N"] == 1
    # log_on_batch_idx counts batches of the epoch: batch 4 at global step 7 is due
    by_batch = ImageLogger(batch_frequency=4, max_images=1, increase_log_steps=False, log_on_batch_idx=True)
    module.global_step = 7
    by_batch.on_train_batch_end(trainer, module, None, {}, 4)
    assert module.calls[-1]["step"] == 7 and len(module.calls) == 4


def test_image_logger_enable_autocast_is_cuda_autocast_on_or_off():
    """generative-models' enable_autocast wraps log_images in torch.cuda.amp.autocast(enabled=...): on a CUDA
    module autocast is entered (in the autocast dtype) or switched off; without the parameter (None, latent-diffusion)
    and on other devices the ambient state is left alone."""
    import contextlib
    from types import SimpleNamespace

    from ldm.training.callbacks import ImageLogger

    cuda = torch.device("cuda")
    assert isinstance(ImageLogger(1, 1)._autocast(cuda), contextlib.nullcontext)
    assert isinstance(ImageLogger(1, 1, enable_autocast=True)._autocast(torch.device("cpu")), contextlib.nullcontext)
    off = ImageLogger(1, 1, enable_autocast=False)._autocast(cuda)
    assert isinstance(off, torch.autocast) and off.device == "cuda" and not off._enabled
    on = ImageLogger(1, 1, enable_autocast=True)._autocast(cuda)
    assert isinstance(on, torch.autocast) and on.fast_dtype == torch.get_autocast_dtype("cuda")
    assert on._enabled == torch.cuda.is_available()  # torch turns CUDA autocast off itself where there is no CUDA
    module = Painter()
    logger = ImageLogger(1, 1, enable_autocast=False, log_first_step=True, increase_log_steps=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a CPU module keeps the autocast it runs under
        logger.log_img(SimpleNamespace(is_global_zero=False), module, {}, 0)
    assert module.calls[0]["autocast"] is True
