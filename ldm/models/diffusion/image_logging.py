"""Small helpers that turn sampling intermediates into images for `log_images`."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid


def rows_to_grid(samples: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-step batches [n_steps x (B, C, H, W)] into one grid image with a row per sample."""
    n_steps = len(samples)
    stacked = torch.stack(list(samples))  # n_steps, B, C, H, W
    stacked = stacked.transpose(0, 1).reshape(-1, *stacked.shape[2:])  # B*n_steps, C, H, W
    return make_grid(stacked, nrow=n_steps)


def log_txt_as_img(wh: tuple[int, int], xc: Sequence[str], size: int = 10) -> torch.Tensor:
    """Render captions as images in [-1, 1], shape [B, 3, H, W] (PIL's built-in font, wrapped)."""
    width, height = wh
    font = ImageFont.load_default(size=size)
    chars_per_line = max(1, int(40 * (width / 256)))
    images = []
    for text in xc:
        canvas = Image.new("RGB", wh, color="white")
        draw = ImageDraw.Draw(canvas)
        lines = "\n".join(text[i:i + chars_per_line] for i in range(0, len(text), chars_per_line))
        draw.text((0, 0), lines, fill="black", font=font)
        images.append(np.asarray(canvas).transpose(2, 0, 1) / 127.5 - 1.0)
    return torch.tensor(np.stack(images), dtype=torch.float32)
