"""Checkpoints written during training appear whole or not at all (see `ldm.util.atomic_path`)."""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ldm.util import atomic_path

logger = logging.getLogger(__name__)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, unwritable directory); the message names the file."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves go through a temporary file in the target directory and an
    `os.replace`, so an interrupted save (crash, SIGKILL, full disk) never leaves a truncated .ckpt."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Write `checkpoint` to `path` atomically (remote URLs fall back to Lightning's own writer)."""
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        logger.debug("Saving checkpoint %s", path)
        try:
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
        except OSError as err:
            raise CheckpointWriteError(f"could not write checkpoint {path}: {err}; the previous "
                                       f"{os.path.basename(str(path))} (if any) is unchanged") from err
