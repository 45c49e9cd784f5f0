"""Test-only config targets for main.py runs (this directory is put on PYTHONPATH): a tiny image dataset and
callbacks that report what each process saw, to files outside the run directory."""
import hashlib
import json
import os
import time

import numpy as np
from pytorch_lightning.callbacks import Callback
from torch.utils.data import Dataset


class TinyImages(Dataset):
    """`length` fixed random images, HWC float32 in [-1, 1], with a caption and a class label."""

    def __init__(self, size=8, length=8, seed=0):
        self.size, self.length, self.seed = size, length, seed

    def __len__(self):
        return self.length

    def __getitem__(self, idx):
        rng = np.random.RandomState(self.seed * 100003 + idx)
        image = rng.uniform(-1, 1, size=(self.size, self.size, 3)).astype(np.float32)
        return {"image": image, "caption": f"image {idx}", "class_label": idx % 2}


def state_hash(module):
    """sha256 over every tensor of a state dict, in key order."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def class_names(objects):
    """module.Class of each object (which Lightning namespace a callback or logger came from)."""
    return [f"{type(o).__module__}.{type(o).__qualname__}" for o in objects]


def write_json(path, payload):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as handle:
        json.dump(payload, handle)
    os.replace(tmp, path)


class Recorder(Callback):
    """Writes `rank<r>_start.json` (with the module attributes named in `attrs`), `rank<r>_progress.json` (every
    step) and `rank<r>_end.json` to out_dir; with `sleep` it slows each step so a test can signal mid-training."""

    def __init__(self, out_dir, sleep=0.0, attrs=()):
        self.out_dir, self.sleep, self.attrs = out_dir, sleep, list(attrs)

    def _path(self, trainer, event):
        return os.path.join(self.out_dir, f"rank{trainer.global_rank}_{event}.json")

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        states = [s for s in opt.state.values() if "step" in s]
        write_json(self._path(trainer, "start"), {
            "global_step": trainer.global_step,
            "learning_rate": pl_module.learning_rate,
            "optimizer_lr": opt.param_groups[0]["lr"],
            "adam_step": float(states[0]["step"]) if states else 0.0,
            "ema_updates": int(pl_module.model_ema.num_updates) if getattr(pl_module, "model_ema", None) else None,
            "world_size": trainer.world_size,
            **{name: getattr(pl_module, name) for name in self.attrs},
        })

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        write_json(self._path(trainer, "progress"), {"global_step": trainer.global_step, "pid": os.getpid()})
        if self.sleep:
            time.sleep(self.sleep)

    def on_train_end(self, trainer, pl_module):
        write_json(self._path(trainer, "end"), {"global_step": trainer.global_step, "hash": state_hash(pl_module),
                                                "learning_rate": pl_module.learning_rate,
                                                "checkpoint_callbacks": class_names(trainer.checkpoint_callbacks),
                                                "loggers": class_names(trainer.loggers),
                                                "callbacks": class_names(trainer.callbacks)})


class Boom(Callback):
    """Raises RuntimeError when training reaches `at_step`."""

    def __init__(self, at_step):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError(f"boom at step {self.at_step}")

