"""Small helpers that turn sampling intermediates into images for `log_images`."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.utils import make_grid

from ldm.util import log_txt_as_img  # noqa: F401 - kept importable here for the loggers that used this path


def rows_to_grid(samples: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-step batches [n_steps x (B, C, H, W)] into one grid image with a row per sample."""
    n_steps = len(samples)
    stacked = torch.stack(list(samples))  # n_steps, B, C, H, W
    stacked = stacked.transpose(0, 1).reshape(-1, *stacked.shape[2:])  # B*n_steps, C, H, W
    return make_grid(stacked, nrow=n_steps)
