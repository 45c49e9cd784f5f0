"""Fault tolerance of main.py, measured on a tiny latent diffusion model trained from tar shards on the CPU.

    python scripts/reliability.py --kills 10            # all experiments, prints the figures, exit 1 if a target fails
    python scripts/reliability.py --only kills --kills 3 --workdir /tmp/rel

Experiments (each in its own directory under --workdir, default a temporary one):
- kills: a run (EMA, LR schedule, scale_by_std, checkpoint every --interval steps) is SIGKILLed --kills times, after
  a random step of the next two intervals and, every other time, while a checkpoint is being written (a throttled
  writer makes the write last ~0.3 s), and resumed with `main.py -r` each time. Counted: kills survived (the resume trains to the end),
  checkpoints that do not load (corrupt), steps lost per kill (last step done - step resumed from; target <= one
  interval), and whether the final checkpoint equals an uninterrupted run's bit for bit (weights, EMA,
  optimizer, LR scheduler, scale_factor, data position): then everything was restored.
- nan: NaN images at steps 5, 9 and 10 (skipped and counted; training completes with finite weights, and the
  weights after a skipped step are those before it); NaN from step 8 on (stops after max_consecutive=3 with exit
  3, last.ckpt of step 8 untouched); a NaN weight (the save is refused, last.ckpt of step 4 untouched).
- disk: the writes fail from step 8 on with ENOSPC and with EACCES: exit 1 with one line naming the file, and
  the previous last.ckpt intact.
- corrupt: 5% of the images of the shards are corrupt: training completes, every bad file counted and named.

The instruments (StepFile, ThrottledSaves, PoisonBatches, PoisonWeights, FailSaves) are callbacks in this file,
named as config targets `reliability.<Class>`; the script puts its own folder on the runs' PYTHONPATH.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.callbacks import Callback  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402

from ldm.data.shard_writer import write_shards  # noqa: E402
from ldm.util import atomic_path  # noqa: E402

MAIN = REPO / "main.py"


# ------------------------------------------------------------------------------------------- instruments
class StepFile(Callback):
    """Writes `<out>` = {"step": global step, "hash": sha256 of the weights} after every training batch, and
    appends the pair to `<out>.jsonl`."""

    def __init__(self, out: str):
        self.out = out

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        record = {"step": trainer.global_step, "hash": weights_hash(pl_module.model)}
        with atomic_path(self.out) as tmp, open(tmp, "w") as handle:
            json.dump(record, handle)
        with open(self.out + ".jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")


class ThrottledSaves(Callback):
    """Makes torch.save write in 64 KiB pieces with a pause after each (a slow disk), so a write lasts `seconds`."""

    def __init__(self, seconds: float = 0.5):
        self.seconds = seconds

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        real_save = torch.save

        def slow_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            start = time.monotonic()
            with open(f, "wb") as handle:
                for i in range(0, len(data), 65536):
                    handle.write(data[i:i + 65536])
                    handle.flush()
                    pause = start + self.seconds * (i + 65536) / len(data) - time.monotonic()
                    if pause > 0:  # keep pace with `seconds` in all, whatever one sleep costs
                        time.sleep(pause)

        torch.save = slow_save


class PoisonBatches(Callback):
    """Puts a NaN into the first image of the batches at the given global steps (`from_step`: every step from it)."""

    def __init__(self, steps: Sequence[int] = (), from_step: int | None = None, key: str = "jpg"):
        self.steps, self.from_step, self.key = set(steps), from_step, key

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step in self.steps or (self.from_step is not None and step >= self.from_step):
            batch[self.key][0, 0, 0, 0] = float("nan")


class PoisonWeights(Callback):
    """Sets one UNet weight to NaN after the batch of global step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.model.parameters()).view(-1)[0] = float("nan")


class FailSaves(Callback):
    """From global step `from_step` on, torch.save writes part of the file and fails with OSError(`code`)."""

    def __init__(self, from_step: int, code: int = errno.ENOSPC):
        self.from_step, self.code = from_step, code

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        real_save, instrument = torch.save, self

        def failing_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            if trainer.global_step < instrument.from_step:
                return real_save(obj, f, *args, **kwargs)
            with open(f, "wb") as handle:
                handle.write(b"PK\x03\x04 part of a checkpoint")
            raise OSError(instrument.code, os.strerror(instrument.code))

        torch.save = failing_save


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- fixture
def fixture_shards(out: Path, shards: int = 8, per_shard: int = 8, corrupt_every: int | None = None) -> list[str]:
    """16x16 PNG shards; with `corrupt_every`, every n-th image is damaged (truncated or garbage). The bad keys."""
    bad: list[str] = []

    def samples():
        for index in range(shards * per_shard):
            pixels = np.random.default_rng(index).integers(0, 256, (16, 16, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            data, key = buffer.getvalue(), f"{index:09d}"
            if corrupt_every and index % corrupt_every == corrupt_every - 1:
                data = data[: len(data) // 3] if len(bad) % 2 else b"\x89PNG garbage" * 8
                bad.append(key)
            yield {"__key__": key, "png": data, "txt": f"image {index}", "json": {"width": 16, "height": 16}}

    write_shards(samples(), out, per_shard)
    return bad


def autoencoder_checkpoint(path: Path) -> Path:
    """A seeded random 16x16 -> 4x4x4 KL autoencoder, saved once (every run loads the same first stage)."""
    from ldm.util import instantiate_from_config

    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": instantiate_from_config(AUTOENCODER).state_dict()}, path)
    return path


AUTOENCODER = {"target": "ldm.models.autoencoder.AutoencoderKL",
               "params": {"embed_dim": 4, "lossconfig": {"target": "torch.nn.Identity"},
                          "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3,
                                       "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1], "num_res_blocks": 1,
                                       "attn_resolutions": [], "dropout": 0.0}}}


def run_config(shards: Path, ae: Path, interval: int, callbacks: dict[str, Any], **guard: Any) -> dict[str, Any]:
    """The tiny LDM (EMA, LambdaLinearScheduler warm-up, scale_by_std) from the shards, last.ckpt every interval."""
    first = json.loads(json.dumps(AUTOENCODER))
    first["params"]["ckpt_path"] = str(ae)
    unet = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {"image_size": 4, "in_channels": 4, "out_channels": 4, "model_channels": 64,
                       "attention_resolutions": [], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2}}
    scheduler = {"target": "ldm.lr_scheduler.LambdaLinearScheduler",
                 "params": {"warm_up_steps": [10], "cycle_lengths": [10**6], "f_start": [0.1], "f_max": [1.0],
                            "f_min": [1.0]}}
    lightning = {"callbacks": {"image_logger": None, **callbacks},
                 "modelcheckpoint": {"params": {"every_n_train_steps": interval, "monitor": None, "save_top_k": 0}},
                 "trainer": {"log_every_n_steps": 1, "enable_model_summary": False, "num_sanity_val_steps": 0,
                             "enable_progress_bar": False}}
    if guard:
        lightning["nan_guard"] = guard
    return {"model": {"base_learning_rate": 1e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": {"linear_start": 0.0015, "linear_end": 0.0155, "timesteps": 100,
                                 "first_stage_key": "jpg", "image_size": 4, "channels": 4, "scale_by_std": True,
                                 "use_ema": True, "cond_stage_config": "__is_unconditional__",
                                 "first_stage_config": first, "unet_config": unet, "scheduler_config": scheduler}},
            "data": {"target": "ldm.data.laion.WebDataModuleFromConfig",
                     "params": {"tar_base": str(shards), "batch_size": 4, "num_workers": 0,
                                "train": {"shards": "{00000..00007}.tar", "shuffle": 8}}},
            "lightning": lightning}


def env() -> dict[str, str]:
    """main.py's environment: this folder and the repository importable, one thread."""
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), str(REPO), out.get("PYTHONPATH", "")])
    out["OMP_NUM_THREADS"] = "1"
    out.pop("LDM_MAIN_LOGDIR", None)
    return out


def main_py(cwd: Path, *args: str, background: bool = False) -> Any:
    """main.py -l logs <args> in cwd (its own session), finished or (background) running."""
    command = [sys.executable, str(MAIN), "-l", "logs", *args]
    if background:
        log = open(cwd / "main.out", "ab")
        return subprocess.Popen(command, cwd=cwd, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return subprocess.run(command, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=1200, start_new_session=True)


def load_ckpt(path: Path) -> dict[str, Any] | None:
    """The checkpoint read as a resume reads it (weights_only), or None when it does not load."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure to load counts as a corrupt checkpoint
        return None


def read_json(path: Path) -> Any:
    """A JSON file, or None while it does not exist yet."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def equal(a: Any, b: Any) -> bool:
    """Deep equality of checkpoint parts (tensors bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            bool(torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def restored_parts(final: dict[str, Any], reference: dict[str, Any]) -> dict[str, bool]:
    """Which parts of the killed-and-resumed run's final checkpoint equal the uninterrupted run's."""
    def pick(ckpt: dict[str, Any], prefix: str) -> dict[str, Any]:
        return {k: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}

    def loader(ckpt: dict[str, Any]) -> Any:
        return ckpt["loops"]["fit_loop"]["state_dict"].get("combined_loader")

    def rng(ckpt: dict[str, Any]) -> Any:
        return [v for k, v in ckpt["callbacks"].items() if k.startswith("RandomState")]

    return {"weights": equal(pick(final, "model.diffusion_model"), pick(reference, "model.diffusion_model")),
            "EMA": equal(pick(final, "model_ema."), pick(reference, "model_ema.")),
            "optimizer": equal(final["optimizer_states"], reference["optimizer_states"]),
            "LR scheduler": equal(final["lr_schedulers"], reference["lr_schedulers"]),
            "scale_factor": equal(final["state_dict"]["scale_factor"], reference["state_dict"]["scale_factor"]),
            "data position": equal(loader(final), loader(reference)),
            "random state": equal(rng(final), rng(reference)),
            "global step": final["global_step"] == reference["global_step"]}


def wait(predicate: Any, proc: subprocess.Popen, timeout: float = 600) -> Any:
    """Poll `predicate` every 2 ms until it is truthy; None when the run ended or the time ran out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            return None
        time.sleep(0.002)
    return None


def kill_once(proc: subprocess.Popen, logs: Path, step_file: Path, start: int, inside_write: bool,
              rng: random.Random, interval: int) -> dict[str, Any] | None:
    """Let the run train past `start` (and write its first last.ckpt), then SIGKILL every process of it: inside a
    checkpoint write, or right after a random step of the next two intervals; what was seen at the kill,
    or None when the run finished first."""
    target = start + 1 if inside_write else start + rng.randint(1, 2 * interval)

    def trained() -> bool:
        step = (read_json(step_file) or {}).get("step", -1)
        return step >= target and bool(list(logs.glob("*/checkpoints/last.ckpt")))

    if not wait(trained, proc):
        return None
    ckptdir = next(logs.glob("*/checkpoints"))
    if inside_write:
        if not wait(lambda: list(ckptdir.glob(".*.tmp")), proc):
            return None
        time.sleep(rng.uniform(0.0, 0.15))
    else:  # a step of this tiny model takes tens of ms, a throttled write 0.3 s: kill at once, not later
        time.sleep(rng.uniform(0.0, 0.02))
    if proc.poll() is not None:
        return None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return {"step": (read_json(step_file) or {}).get("step", 0), "temp_file": bool(list(ckptdir.glob(".*.tmp"))),
            "inside_write": inside_write}


def kill_experiment(work: Path, kills: int, interval: int, steps: int, seed: int) -> dict[str, Any]:
    """SIGKILL a run `kills` times and resume it each time; the figures (see the module docstring)."""
    rng = random.Random(seed)
    shards, ae = work / "shards", autoencoder_checkpoint(work / "ae.ckpt")
    fixture_shards(shards)
    dirs = {name: work / name for name in ("reference", "killed")}
    for name, where in dirs.items():
        where.mkdir(parents=True)
        callbacks = {"steps": {"target": "reliability.StepFile", "params": {"out": str(where / "step.json")}},
                     "slow_disk": {"target": "reliability.ThrottledSaves", "params": {"seconds": 0.3}}}
        OmegaConf.save(OmegaConf.create(run_config(shards, ae, interval, callbacks)), where / "c.yaml")
    common = ["-t", "--no-test", "--max_steps", str(steps)]
    reference = main_py(dirs["reference"], "-b", "c.yaml", *common)
    if reference.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{reference.stdout[-3000:]}")
    where = dirs["killed"]
    proc, start, events, corrupt = main_py(where, "-b", "c.yaml", *common, background=True), -1, [], 0
    for k in range(kills):
        seen = kill_once(proc, where / "logs", where / "step.json", start, inside_write=k % 2 == 1, rng=rng,
                         interval=interval)
        if seen is None:
            break
        ckptdir = next((where / "logs").glob("*/checkpoints"))
        corrupt += sum(load_ckpt(p) is None for p in ckptdir.glob("*.ckpt"))
        last = load_ckpt(ckptdir / "last.ckpt")
        start = last["global_step"] if last else 0
        seen["lost"] = seen["step"] - start
        events.append(seen)
        (where / "step.json").unlink()  # the resumed run's progress only, not the killed one's last step
        proc = main_py(where, "-r", str(ckptdir.parent), *common, background=True)
    proc.wait()
    (run,) = (where / "logs").iterdir()
    final, ref_ckpt = load_ckpt(run / "checkpoints" / "last.ckpt"), load_ckpt(
        next((dirs["reference"] / "logs").iterdir()) / "checkpoints" / "last.ckpt")
    return {"kills": len(events), "survived": len(events) if proc.returncode == 0 else len(events) - 1,
            "inside_write": sum(e["temp_file"] for e in events), "corrupt_checkpoints": corrupt,
            "steps_lost": [e["lost"] for e in events], "interval": interval,
            "restored": restored_parts(final, ref_ckpt) if final and ref_ckpt else {}}


def _guard_run(work: Path, name: str, callbacks: dict[str, Any], steps: int, **guard: Any) -> dict[str, Any]:
    where = work / name
    where.mkdir(parents=True)
    callbacks = {"steps": {"target": "reliability.StepFile", "params": {"out": str(where / "step.json")}},
                 **callbacks}
    OmegaConf.save(OmegaConf.create(run_config(work / "shards", work / "ae.ckpt", 4, callbacks, **guard)),
                   where / "c.yaml")
    proc = main_py(where, "-b", "c.yaml", "-t", "--no-test", "--max_steps", str(steps))
    (where / "main.out").write_text(proc.stdout)
    run = next((where / "logs").iterdir())
    last = load_ckpt(run / "checkpoints" / "last.ckpt")
    errors = [line for line in proc.stdout.splitlines() if line.startswith("main.py: error:")]
    history = [json.loads(line) for line in (where / "step.json.jsonl").read_text().splitlines()]
    return {"code": proc.returncode, "errors": errors, "last": last, "history": history, "output": proc.stdout,
            "temp_files": [p.name for p in (run / "checkpoints").iterdir() if p.suffix == ".tmp"]}


def _finite(ckpt: dict[str, Any] | None) -> bool:
    return bool(ckpt) and all(bool(torch.isfinite(v).all()) for v in ckpt["state_dict"].values()
                              if isinstance(v, torch.Tensor) and v.is_floating_point())


def nan_experiment(work: Path) -> dict[str, Any]:
    """Skipped NaN steps, the stop after consecutive ones, and the refused NaN checkpoint."""
    fixture_shards(work / "shards")
    autoencoder_checkpoint(work / "ae.ckpt")
    poison = {"target": "reliability.PoisonBatches", "params": {"steps": [5, 9, 10]}}
    some = _guard_run(work, "some", {"poison": poison}, 16)
    hashes = {r["step"]: r["hash"] for r in some["history"]}  # weights after the batch that ended at that step
    guard = next((v for k, v in some["last"]["callbacks"].items() if k.startswith("NaNGuard")), {}) \
        if some["last"] else {}
    streak = _guard_run(work, "streak", {"poison": {"target": "reliability.PoisonBatches",
                                                    "params": {"from_step": 8}}}, 40, max_consecutive=3)
    weights = _guard_run(work, "weights", {"poison": {"target": "reliability.PoisonWeights", "params": {"step": 6}}},
                         16)
    return {"skipped": guard.get("skipped"), "completed": some["code"] == 0 and _finite(some["last"]),
            "unchanged_by_skipped_steps": all(hashes.get(s) == hashes.get(s + 1) for s in (5, 9, 10)),
            "changed_by_good_steps": hashes.get(4) != hashes.get(5) and hashes.get(11) != hashes.get(12),
            "streak_code": streak["code"], "streak_errors": streak["errors"],
            "streak_last_step": streak["last"]["global_step"] if streak["last"] else None,
            "streak_last_finite": _finite(streak["last"]),
            "weights_code": weights["code"], "weights_errors": weights["errors"],
            "weights_last_step": weights["last"]["global_step"] if weights["last"] else None,
            "weights_last_finite": _finite(weights["last"])}


def disk_experiment(work: Path) -> dict[str, Any]:
    """Checkpoint writes failing with ENOSPC and EACCES from step 8 on."""
    fixture_shards(work / "shards")
    autoencoder_checkpoint(work / "ae.ckpt")
    out = {}
    for name, code in (("ENOSPC", errno.ENOSPC), ("EACCES", errno.EACCES)):
        run = _guard_run(work, name, {"fail": {"target": "reliability.FailSaves",
                                               "params": {"from_step": 8, "code": code}}}, 16)
        out[name] = {"code": run["code"], "errors": run["errors"], "temp_files": run["temp_files"],
                     "last_step": run["last"]["global_step"] if run["last"] else None}
    return out


def corrupt_experiment(work: Path) -> dict[str, Any]:
    """Shards with every 20th image damaged: the run completes and names every bad file."""
    bad = fixture_shards(work / "shards", corrupt_every=20)
    autoencoder_checkpoint(work / "ae.ckpt")
    run = _guard_run(work, "corrupt", {}, 20)
    state = run["last"]["loops"]["fit_loop"]["state_dict"]["combined_loader"][0] if run["last"] else {}
    report = (state.get("ranks") or [{}])[0].get("report", {}) if state else {}
    named = sorted({key for _, key, _ in report.get("bad_samples", [])})
    logged = sorted({key for key in bad if f"skipped sample {key} of shard" in run["output"]})
    return {"images": 64, "corrupt": len(bad), "completed": run["code"] == 0, "counted": sorted(named) == bad,
            "named_in_log": logged == bad, "bad_keys": bad}


def kill_lines(result: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(figure, value, target met) for the kill experiment."""
    lost = result["steps_lost"]
    restored = result["restored"]
    return [("kills survived (resumed with -r)", f"{result['survived']}/{result['kills']}",
             result["survived"] == result["kills"] > 0),
            ("kills inside a checkpoint write", str(result["inside_write"]), result["inside_write"] > 0),
            ("corrupt checkpoints", str(result["corrupt_checkpoints"]), result["corrupt_checkpoints"] == 0),
            (f"steps lost per kill (interval {result['interval']})", f"max {max(lost, default=0)}, {lost}",
             max(lost, default=0) <= result["interval"]),
            ("final state equal to an uninterrupted run's",
             ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in restored.items()), bool(restored) and
             all(restored.values()))]


def nan_lines(result: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(figure, value, target met) for the NaN experiment."""
    streak_ok = result["streak_code"] == 3 and result["streak_last_step"] == 8 and result["streak_last_finite"]
    weights_ok = result["weights_code"] == 3 and result["weights_last_step"] == 4 and result["weights_last_finite"]
    return [("NaN steps skipped (of 3)", str(result["skipped"]), result["skipped"] == 3 and result["completed"]),
            ("weights unchanged by skipped steps, changed by good ones",
             f"{result['unchanged_by_skipped_steps']}, {result['changed_by_good_steps']}",
             result["unchanged_by_skipped_steps"] and result["changed_by_good_steps"]),
            ("NaN from step 8: exit code, last.ckpt step, finite",
             f"{result['streak_code']}, {result['streak_last_step']}, {result['streak_last_finite']}", streak_ok),
            ("NaN weight: exit code, last.ckpt step, finite",
             f"{result['weights_code']}, {result['weights_last_step']}, {result['weights_last_finite']}", weights_ok)]


def disk_lines(result: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(figure, value, target met) for the failing-disk experiment."""
    lines = []
    for name, run in result.items():
        message = run["errors"][0] if run["errors"] else "(no error line)"
        ok = run["code"] == 1 and len(run["errors"]) == 1 and "last.ckpt" in message and run["last_step"] == 4 \
            and not run["temp_files"]
        lines.append((f"{name} at step 8: exit, previous last.ckpt step, error", f"{run['code']}, "
                      f"{run['last_step']}, {message[:110]}", ok))
    return lines


def corrupt_lines(result: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(figure, value, target met) for the corrupt-data experiment."""
    return [(f"corrupt images ({result['corrupt']} of {result['images']}): run completes, counted, named in log",
             f"{result['completed']}, {result['counted']}, {result['named_in_log']} ({', '.join(result['bad_keys'])})",
             result["completed"] and result["counted"] and result["named_in_log"])]


def get_parser() -> argparse.ArgumentParser:
    """Experiments, kill count, checkpoint interval, steps, seed, work directory."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--only", nargs="*", choices=("kills", "nan", "disk", "corrupt"), default=None, help="default: all")
    add("--kills", type=int, default=10)
    add("--interval", type=int, default=5, help="checkpoint every this many steps")
    add("--steps", type=int, default=None, help="training steps of the killed run (default 25 per kill)")
    add("--seed", type=int, default=0, help="seed of the kill moments")
    add("--workdir", default=None, help="keep the runs here (default: a temporary directory, removed)")
    return parser


def run_experiments(args: argparse.Namespace, work: Path) -> list[tuple[str, str, bool]]:
    """Every chosen experiment's figures."""
    chosen = args.only or ["kills", "nan", "disk", "corrupt"]
    lines: list[tuple[str, str, bool]] = []
    if "kills" in chosen:
        steps = args.steps or 25 * max(1, args.kills)
        lines += kill_lines(kill_experiment(work / "kills", args.kills, args.interval, steps, args.seed))
    if "nan" in chosen:
        lines += nan_lines(nan_experiment(work / "nan"))
    if "disk" in chosen:
        lines += disk_lines(disk_experiment(work / "disk"))
    if "corrupt" in chosen:
        lines += corrupt_lines(corrupt_experiment(work / "corrupt"))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiments and print one line per figure; exit 1 when a target is missed."""
    args = get_parser().parse_args(argv)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        lines = run_experiments(args, work)
    width = max(len(name) for name, _, _ in lines)
    for name, value, ok in lines:
        print(f"{'ok  ' if ok else 'FAIL'} {name:<{width}}  {value}")
    print(f"{sum(ok for *_, ok in lines)}/{len(lines)} targets met in {time.monotonic() - start:.0f} s")
    return 0 if all(ok for *_, ok in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
