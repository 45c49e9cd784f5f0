"""What every MiDaS network shares: loading a MiDaS weight file into itself."""
from __future__ import annotations

import logging
import os

import torch

from ldm.util import CheckpointError, read_checkpoint

logger = logging.getLogger(__name__)


class BaseModel(torch.nn.Module):
    """A MiDaS network whose weights load from the published files (a bare state dict, or {"model", "optimizer"})."""

    def load(self, path: str | os.PathLike) -> None:
        """Load the weights of `path` strictly (read with weights_only=True; .safetensors works too)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"MiDaS weights '{path}' do not exist (model_path of {type(self).__name__})")
        state, _ = read_checkpoint(path)
        if "optimizer" in state and isinstance(state.get("model"), dict):  # the training checkpoints of MiDaS 2.1
            state = state["model"]
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            raise CheckpointError(f"MiDaS weights '{path}' do not fit {type(self).__name__}: {lines[-1]}") from None
        if missing or unexpected:
            raise CheckpointError(
                f"MiDaS weights '{path}' do not fit {type(self).__name__}: {len(missing)} missing keys "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
            )
        logger.info("%s: loaded %d tensors from %s", type(self).__name__, len(state), path)
