"""SD 2's `ucg_training` caption dropout, trained for real: over many batches the share of captions replaced by the
null value is the configured rate, and which ones are dropped is the original's draw (one
`ucg_prng.choice(2, p=[1 - p, p])` per caption, in batch order)."""
from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ldm.models.diffusion.ddpm import DDPM

UNET = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": {"image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32,
                   "attention_resolutions": [], "num_res_blocks": 1, "channel_mult": [1], "num_heads": 1}}
STEPS, BATCH = 200, 16


class Captions(Dataset):
    """Images with numbered captions; the caption says which sample it came from."""

    def __len__(self) -> int:
        return STEPS * BATCH

    def __getitem__(self, idx: int) -> dict:
        return {"image": torch.zeros(8, 8, 3), "caption": f"caption {idx}"}


class SeenCaptions(DDPM):
    """A DDPM whose loss records the captions training_step hands on (a trivial loss keeps the steps fast)."""

    def shared_step(self, batch: dict):
        self.seen.append(list(batch["caption"]))
        loss = sum(p.sum() for p in self.model.parameters()) * 0.0
        return loss, {"train/loss": loss.detach()}


@pytest.mark.parametrize("p, null", [(0.1, None), (0.5, "<null>")])
def test_caption_dropout_rate_over_many_batches_and_the_original_draw(tmp_path, p, null):
    torch.manual_seed(0)
    model = SeenCaptions(unet_config=UNET, timesteps=10, image_size=8, channels=3, use_ema=False,
                         first_stage_key="image", ucg_training={"caption": {"p": p, "val": null}})
    model.learning_rate = 1e-4
    model.ucg_prng = np.random.RandomState(123)
    model.seen = []
    trainer = pl.Trainer(accelerator="cpu", max_steps=STEPS, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(model, DataLoader(Captions(), batch_size=BATCH, shuffle=False))
    seen = [caption for batch in model.seen for caption in batch]
    assert len(seen) == STEPS * BATCH
    expected_null = "" if null is None else null
    dropped = np.array([caption == expected_null for caption in seen])
    assert all(caption == f"caption {i}" for i, caption in enumerate(seen) if not dropped[i])  # others untouched
    # 3200 draws: the share's standard deviation is at most 0.009, the tolerance ~3.5 of them
    assert abs(dropped.mean() - p) < 0.03
    # the original's stream: one choice(2, p=[1 - p, p]) per caption from the model's ucg_prng
    reference = np.random.RandomState(123)
    assert np.array_equal(dropped, [bool(reference.choice(2, p=[1 - p, p])) for _ in seen])
