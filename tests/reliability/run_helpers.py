"""Test-only config targets for main.py runs in the scale and reliability tests (this directory goes on PYTHONPATH):
a callback that records a hash of every training batch, one that kills the run, and one that poisons the loss."""
import hashlib
import json
import os
import signal

import torch
from pytorch_lightning.callbacks import Callback


def batch_digest(batch, keys=("__key__",), tensors=None):
    """sha256 over the batch's sample keys and the bytes of its tensors (every tensor when `tensors` is None)."""
    digest = hashlib.sha256()
    for key in keys:
        digest.update(json.dumps(list(batch[key])).encode())
    for key in sorted(batch):
        value = batch[key]
        if isinstance(value, torch.Tensor) and (tensors is None or key in tensors):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class BatchRecorder(Callback):
    """Appends one JSON line per training batch to `<out_dir>/rank<r>.jsonl`: step, epoch, keys and digest."""

    def __init__(self, out_dir, keys=("__key__",)):
        self.out_dir, self.keys = out_dir, list(keys)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        os.makedirs(self.out_dir, exist_ok=True)
        keys = [k for k in self.keys if k in batch]
        record = {"step": trainer.global_step, "batch_idx": batch_idx, "epoch": trainer.current_epoch,
                  "keys": [list(batch[k]) for k in keys], "digest": batch_digest(batch, keys)}
        if "__epoch__" in batch:
            record["data_epochs"] = batch["__epoch__"].tolist()
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.jsonl"), "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


class KillAt(Callback):
    """SIGKILLs the whole process group (every rank) when training reaches `step`, before that batch runs."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.killpg(os.getpgid(0), signal.SIGKILL)


def fixture_image(index, size=8, fmt="PNG"):
    """The encoded bytes of a seeded random RGB image."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(index).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def fixture_samples(count, size=8, start=0):
    """img2dataset-style samples: png/jpg/webp images (in turn), captions and json with the sizes."""
    formats = [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")]
    for index in range(start, start + count):
        ext, fmt = formats[index % 3]
        yield {"__key__": f"{index:09d}", ext: fixture_image(index, size, fmt), "txt": f"caption {index}",
               "json": {"width": size, "height": size, "original_width": size, "original_height": size,
                        "key": f"{index:09d}"}}


def write_fixture_shards(out_dir, shards=8, per_shard=6, size=8):
    """`shards` tar shards of `per_shard` samples each in out_dir (00000.tar, ...); their paths."""
    from ldm.data.shard_writer import write_shards

    return write_shards(fixture_samples(shards * per_shard, size), out_dir, per_shard)


# ------------------------------------------------------------------------------------------------ main.py runs
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAIN = os.path.join(REPO, "main.py")


def tiny_shard_config(shard_dir, rec_dir, workers=0, every_n_steps=5, shuffle=4):
    """The tiny pixel-space DDPM (8x8 images, 20 timesteps, 2-level 32-channel UNet) trained from tar shards,
    checkpointing last.ckpt every `every_n_steps` steps and recording every batch."""
    return {
        "model": {
            "base_learning_rate": 1.0e-4,
            "target": "ldm.models.diffusion.ddpm.DDPM",
            "params": {
                "timesteps": 20, "image_size": 8, "channels": 3, "first_stage_key": "jpg",
                "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                "params": {"image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32,
                                           "attention_resolutions": [], "num_res_blocks": 1, "channel_mult": [1, 2],
                                           "num_heads": 4}},
            },
        },
        "data": {"target": "ldm.data.laion.WebDataModuleFromConfig",
                 "params": {"tar_base": str(shard_dir), "batch_size": 2, "num_workers": workers,
                            "train": {"shards": "{00000..00007}.tar", "shuffle": shuffle}}},
        "lightning": {
            "callbacks": {"image_logger": None,
                          "recorder": {"target": "run_helpers.BatchRecorder", "params": {"out_dir": str(rec_dir)}}},
            "modelcheckpoint": {"params": {"every_n_train_steps": every_n_steps, "monitor": None, "save_top_k": 0}},
            "trainer": {"log_every_n_steps": 1, "enable_model_summary": False, "num_sanity_val_steps": 0,
                        "enable_progress_bar": False},
        },
    }


def main_env(**extra):
    """The environment of a main.py subprocess: this directory and the repository on PYTHONPATH, one thread, and
    faulthandler on (a run that hangs is stopped with SIGABRT, which makes every process print its Python stacks);
    `extra` variables on top."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), REPO, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"
    env.pop("LDM_MAIN_LOGDIR", None)
    env.update(extra)
    return env


def run_main(cwd, *args, timeout=600, env=None):
    """`python main.py -l logs <args>` in cwd, in its own session (so KillAt kills only this run), with main_env(**env);
    the CompletedProcess, stdout and stderr together in .stdout and .output. A run still going after `timeout` s fails
    the test with the Python stacks of all its processes (ranks and DataLoader workers)."""
    import subprocess
    import sys

    args = [sys.executable, MAIN, "-l", "logs", *map(str, args)]
    proc = subprocess.Popen(args, cwd=cwd, env=main_env(**(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import time

        for pid in sorted(_session_pids(proc.pid), reverse=True):  # one at a time: their dumps do not interleave
            _signal(pid, signal.SIGABRT)
            time.sleep(0.5)
        try:
            output, _ = proc.communicate(timeout=30)
        finally:
            _signal(-proc.pid, signal.SIGKILL)
            proc.wait()
        stacks = "\n".join(line for line in output.splitlines() if not line.startswith("Extension modules:"))
        raise AssertionError(f"{' '.join(args[1:])} still running after {timeout} s; its processes' stacks at "
                             f"SIGABRT:\n{stacks[-20000:]}") from None
    done = subprocess.CompletedProcess(args, proc.returncode, stdout=output)
    done.output = output
    return done


def _session_pids(sid):
    """The processes of session `sid` (from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # not a process, or gone
            continue
        if int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def _signal(pid, sig):
    """os.kill, or os.killpg for a negative pid; nothing when it has exited."""
    try:
        os.killpg(-pid, sig) if pid < 0 else os.kill(pid, sig)
    except ProcessLookupError:
        pass


def read_records(path):
    """The BatchRecorder lines of one rank."""
    with open(path) as handle:
        return [json.loads(line) for line in handle]


# ------------------------------------------------------------------------------------------------ sharded training
class IndexedImages(torch.utils.data.Dataset):
    """`length` fixed random 8x8 images with their index (the sample-seeded model below draws its noise from it)."""

    def __init__(self, length=4, size=8):
        self.length, self.size = length, size

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        import numpy as np

        pixels = np.random.default_rng(index).uniform(-1, 1, (self.size, self.size, 3)).astype("float32")
        return {"image": pixels, "index": index}


def _sample_seeded_ddpm():
    from ldm.models.diffusion.ddpm import DDPM

    class SampleSeededDDPM(DDPM):
        """DDPM whose timesteps and noise depend on (sample index, step), not on the process: one process with a
        batch of 4 then computes exactly what two processes with 2 each compute together."""

        def shared_step(self, batch):
            x = self.get_input(batch, self.first_stage_key)
            steps, noise = [], []
            for index in batch["index"].tolist():
                generator = torch.Generator().manual_seed(int(index) * 100003 + int(self.global_step))
                steps.append(torch.randint(0, self.num_timesteps, (1,), generator=generator))
                noise.append(torch.randn(tuple(x.shape[1:]), generator=generator))
            return self.p_losses(x, torch.cat(steps).to(self.device), noise=torch.stack(noise).to(x))

    return SampleSeededDDPM


SampleSeededDDPM = _sample_seeded_ddpm()


def sharded_config(rec_dir, batch_size, strategy=None, every_n_steps=3):
    """The tiny SampleSeededDDPM (EMA on) on 4 IndexedImages, last.ckpt every `every_n_steps` steps."""
    config = tiny_shard_config("unused", rec_dir, every_n_steps=every_n_steps)
    config["model"]["target"] = "run_helpers.SampleSeededDDPM"
    config["model"]["params"]["first_stage_key"] = "image"
    config["data"] = {"target": "ldm.training.data.DataModuleFromConfig",
                      "params": {"batch_size": batch_size, "num_workers": 0,
                                 "train": {"target": "run_helpers.IndexedImages", "params": {"length": 4}}}}
    config["lightning"]["callbacks"].pop("recorder")
    if strategy is not None:
        config["lightning"]["trainer"]["strategy"] = strategy
    return config
