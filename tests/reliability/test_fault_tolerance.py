"""The fault-tolerance callbacks in a real Lightning Trainer on a tiny linear model: NaNGuard skips and counts bad
steps and stops after too many, refuses non-finite checkpoints; ModuleBatchEndFirst puts the EMA update of step k
into the checkpoint of step k; RandomState restores the generators; AtomicCheckpointIO names the file it failed."""
import errno
import random

import pytorch_lightning as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ldm.training.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError
from ldm.training.fault_tolerance import ModuleBatchEndFirst, NaNGuard, NonFiniteError, RandomState, _rng_states


class Tiny(pl.LightningModule):
    """A linear regression whose loss is NaN at the given global steps; counts its on_train_batch_end calls the
    way DDPM updates its EMA there."""

    def __init__(self, nan_steps=()):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.nan_steps = set(nan_steps)
        self.register_buffer("batch_ends", torch.zeros((), dtype=torch.long))
        self.weights = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        return loss * float("nan") if self.global_step in self.nan_steps else loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.batch_ends += 1
        self.weights[self.global_step] = self.layer.weight.detach().clone()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.1)


def trainer(tmp_path, callbacks, steps=8, **kwargs):
    return pl.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                      accelerator="cpu", **kwargs)


def data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def test_nan_steps_are_skipped_counted_and_leave_the_weights_alone(tmp_path):
    model, guard = Tiny(nan_steps={2, 5}), NaNGuard(max_consecutive=3)
    trainer(tmp_path, [guard]).fit(model, data())
    assert guard.skipped == 2 and guard.consecutive == 0 and guard.last_bad_step == 5
    w = model.weights  # weights after the batch that ended at each global step
    assert torch.equal(w[2], w[3]) and torch.equal(w[5], w[6])  # the NaN batches (steps 2 and 5) changed nothing
    assert not torch.equal(w[1], w[2]) and not torch.equal(w[3], w[4])
    assert torch.isfinite(model.layer.weight).all()
    assert model.trainer.optimizers[0].state[model.layer.weight]["step"] == 6  # Adam stepped 6 times, not 8


def test_consecutive_nan_steps_stop_training_with_a_clear_message(tmp_path):
    guard = NaNGuard(max_consecutive=3)
    with pytest.raises(NonFiniteError, match=r"3 consecutive training steps .*\(steps 4 to 6, 3 in all\)"):
        trainer(tmp_path, [guard], steps=20).fit(Tiny(nan_steps=range(4, 20)), data())


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    model = Tiny()
    fit = trainer(tmp_path, [NaNGuard()], steps=2)
    fit.fit(model, data())
    fit.save_checkpoint(tmp_path / "good.ckpt")
    with torch.no_grad():
        model.layer.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="refusing to save a checkpoint at step 2: 1 weight tensor"):
        fit.save_checkpoint(tmp_path / "good.ckpt")
    assert torch.isfinite(torch.load(tmp_path / "good.ckpt", weights_only=True)["state_dict"]["layer.weight"]).all()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".ckpt", ".tmp")) == ["good.ckpt"]


class SaveAtBatchEnd(pl.Callback):
    """Saves a checkpoint at the end of every batch, as ModelCheckpoint(every_n_train_steps=1) does."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.save_checkpoint(self.folder / f"step{trainer.global_step}.ckpt")


@pytest.mark.parametrize("first", [True, False])
def test_the_checkpoint_of_step_k_holds_the_ema_update_of_step_k(tmp_path, first):
    model = Tiny()
    callbacks = ([ModuleBatchEndFirst()] if first else []) + [SaveAtBatchEnd(tmp_path)]
    trainer(tmp_path, callbacks, steps=3).fit(model, data())
    assert int(model.batch_ends) == 3  # the module's hook ran once per batch either way
    saved = [int(torch.load(tmp_path / f"step{k}.ckpt", weights_only=True)["state_dict"]["batch_ends"])
             for k in (1, 2, 3)]
    assert saved == ([1, 2, 3] if first else [0, 1, 2])  # without it, every checkpoint missed the last update
    assert "on_train_batch_end" not in vars(model)  # the module has its own hook back


def test_random_state_round_trip():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    saved = RandomState().state_dict()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restored = RandomState()
    restored.load_state_dict(saved)
    restored.on_train_start(None, None)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    assert isinstance(_rng_states()["numpy"][1], list)  # plain values: checkpoints load with weights_only


def test_a_failed_checkpoint_write_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)

    def full_disk(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match=f"could not write checkpoint {target}: .*No space left"):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
