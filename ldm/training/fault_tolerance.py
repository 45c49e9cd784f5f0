"""Training that survives bad steps and restarts: a guard against NaN/inf losses and the random state in checkpoints.

`NaNGuard` (on by default, `lightning.nan_guard: {max_consecutive: 10}`, `null` turns it off) checks every step's
loss and, without a gradient scaler, its gradients. A non-finite step is detected on the step it happens: its
optimizer update is skipped (every gradient set to None, so no parameter and no optimizer moment changes; the step
counter and the LR schedule go on, as with a gradient scaler's skipped steps), counted and logged; the processes
agree on the decision. After `max_consecutive` bad steps in a row training stops with `NonFiniteError`. A checkpoint
whose weights hold NaN/inf is never written, so the last good one is never overwritten.

`ModuleBatchEndFirst` runs the module's `on_train_batch_end` (the EMA update) before checkpoints are written.

`RandomState` stores every process's torch (CPU and CUDA), numpy and Python generator states in each checkpoint and
puts them back when a run resumes, so diffusion timesteps and noise continue as if the run had never stopped.
"""
from __future__ import annotations

import logging
import random
from typing import Any

import pytorch_lightning as pl
import numpy as np
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.model_helpers import is_overridden

from ldm.data.resumable import collectives_allowed, gather_from_ranks

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training stopped: too many consecutive non-finite steps, or weights that hold NaN/inf at a save."""


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (the local shard of a DTensor)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _non_finite_grads(optimizer: torch.optim.Optimizer) -> bool:
    grads = [_local(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grads = [g for g in grads if g.numel()]
    if not grads:
        return False
    norms = torch._foreach_norm(grads)
    return not bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


class NaNGuard(Callback):
    """Skip the optimizer step of a non-finite loss (or gradients), count it, stop after `max_consecutive` in a row,
    and refuse to write a checkpoint with non-finite weights (see the module docstring)."""

    def __init__(self, max_consecutive: int = 10, check_gradients: bool = True):
        super().__init__()
        if int(max_consecutive) < 1:
            raise ValueError(f"lightning.nan_guard.max_consecutive must be a positive integer, got {max_consecutive}")
        self.max_consecutive, self.check_gradients = int(max_consecutive), bool(check_gradients)
        self.skipped = self.consecutive = 0
        self.last_bad_step: int | None = None
        self._bad_loss = False

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        """Note a non-finite loss (any micro-batch of the step)."""
        if not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = True

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Decide (on every process alike) whether this step is bad; if so, drop its gradients."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # fp16 scaling skips inf gradients itself
        bad = self._bad_loss or (self.check_gradients and scaler is None and _non_finite_grads(optimizer))
        self._bad_loss = False
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            self.consecutive = 0
            return
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        self.skipped += 1
        self.consecutive += 1
        self.last_bad_step = trainer.global_step
        logger.warning("step %d: non-finite loss or gradients; optimizer step skipped (%d skipped, %d in a row)",
                       trainer.global_step, self.skipped, self.consecutive)
        pl_module.log("nan_guard/skipped_steps", float(self.skipped), on_step=True, on_epoch=False, logger=True)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(f"{self.consecutive} consecutive training steps had a non-finite loss or gradients "
                                 f"(steps {trainer.global_step - self.consecutive + 1} to {trainer.global_step}, "
                                 f"{self.skipped} in all); stopping. The checkpoints written before them are intact; "
                                 "lower the learning rate or check the data, then resume with -r")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Refuse to write weights that hold NaN/inf (the save is abandoned before any file is touched)."""
        bad = [k for k, v in checkpoint.get("state_dict", {}).items()
               if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(_local(v)).all())]
        if trainer.world_size > 1 and collectives_allowed():  # a sharded or rank-0-only state dict: all refuse
            if trainer.strategy.reduce_boolean_decision(bool(bad), all=False) and not bad:
                bad = ["(on another process)"]
        if bad:
            raise NonFiniteError(f"refusing to save a checkpoint at step {trainer.global_step}: {len(bad)} weight "
                                 f"tensor(s) hold NaN/inf (first: {bad[0]}); the previous checkpoints are kept")

    def state_dict(self) -> dict[str, Any]:
        """The counters, kept across resumes."""
        return {"skipped": self.skipped, "consecutive": self.consecutive, "last_bad_step": self.last_bad_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counters."""
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
        self.last_bad_step = state_dict.get("last_bad_step")


def _rng_states() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # plain values: resumes load with weights_only
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
                             "python": list(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RandomState(Callback):
    """Every process's random generator states in the checkpoint, restored when training resumes from it."""

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The states of all processes (each process restores its own)."""
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return {"ranks": gather_from_ranks(_rng_states(), rank, world)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep this process's states for the start of training (after loaders and sanity checks drew theirs)."""
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        ranks = state_dict.get("ranks") or []
        self._pending = ranks[rank] if rank < len(ranks) else None
        if self._pending is None:
            logger.warning("the checkpoint has no random state for rank %d; its noise will differ from an "
                           "uninterrupted run", rank)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the saved generator states back."""
        if self._pending is not None:
            _set_rng_states(self._pending)
            self._pending = None


class ModuleBatchEndFirst(Callback):
    """Runs the LightningModule's `on_train_batch_end` (where DDPM and the autoencoders update their EMA) before the
    callbacks that save checkpoints at the end of a batch, and skips Lightning's own call of it afterwards.

    Lightning calls callbacks' `on_train_batch_end` before the module's, so a checkpoint written there held the
    weights of step k but the EMA of step k - 1: every resume lost one EMA update. With this callback placed before
    the checkpoint callbacks the checkpoint of step k holds the EMA of step k.
    """

    def __init__(self) -> None:
        super().__init__()
        self._ran: tuple[int, int] | None = None
        self._module_hook: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Put a wrapper on the module that skips the call this callback already made."""
        if self._module_hook is not None or not is_overridden("on_train_batch_end", pl_module):
            return
        self._module_hook = module_hook = pl_module.on_train_batch_end

        def after_callbacks(outputs: Any, batch: Any, batch_idx: int) -> None:
            if self._ran == (trainer.global_step, batch_idx):
                self._ran = None
                return
            module_hook(outputs, batch, batch_idx)

        pl_module.on_train_batch_end = after_callbacks

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """The module's hook, now."""
        if self._module_hook is not None:
            self._module_hook(outputs, batch, batch_idx)
            self._ran = (trainer.global_step, batch_idx)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give the module its own hook back."""
        if self._module_hook is not None:
            pl_module.__dict__.pop("on_train_batch_end", None)
            self._module_hook = None
