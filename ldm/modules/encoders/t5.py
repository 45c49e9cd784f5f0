"""Frozen T5 text encoders of Stable Diffusion 2's encoder module: `FrozenT5Embedder` (transformers T5EncoderModel,
hub id or local folder) and `FrozenCLIPT5Encoder` (CLIP and T5 side by side).

Names, constructor parameters and state_dict keys (`transformer.encoder.block.0.layer.0.SelfAttention.q.weight`,
`transformer.shared.weight`, ...; `clip_encoder.*` / `t5_encoder.*`) follow the original
`ldm.modules.encoders.modules`, which re-exports them. A missing model is one `MissingPretrainedModelError`.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from ldm.modules.encoders.frozen import FrozenCLIPEmbedder, FrozenHFTextEmbedder
from ldm.modules.encoders.modules import AbstractEncoder
from ldm.util import count_params

logger = logging.getLogger(__name__)


class FrozenT5Embedder(FrozenHFTextEmbedder):
    """The T5 encoder for text (google/t5-v1_1-large, -xl, -xxl, or a local folder): text -> last hidden states
    [B, max_length, d_model]. As the original, the padded tokens are not masked out."""

    folder_hint = ("a T5EncoderModel (config.json + weights, `save_pretrained`) and its tokenizer (tokenizer.json "
                   "or spiece.model)")
    pass_attention_mask = False  # as the original: padding tokens take part in attention

    def __init__(self, version: str | os.PathLike[str] = "google/t5-v1_1-large", device: Any = "cuda",
                 max_length: int = 77, freeze: bool = True):
        super().__init__(version, device, max_length, freeze)

    def _load_model(self, source: str) -> nn.Module:
        """The T5EncoderModel at `source` (the encoder stack only: no decoder weights)."""
        from transformers import T5EncoderModel

        return T5EncoderModel.from_pretrained(source)


class FrozenCLIPT5Encoder(AbstractEncoder):
    """A FrozenCLIPEmbedder and a FrozenT5Embedder on the same text; returns [clip_z, t5_z] (a list, as the
    original; its widths differ, 768 vs T5's d_model, so a model reads them separately)."""

    def __init__(self, clip_version: str | os.PathLike[str] = "openai/clip-vit-large-patch14",
                 t5_version: str | os.PathLike[str] = "google/t5-v1_1-xl", device: Any = "cuda",
                 clip_max_length: int = 77, t5_max_length: int = 77):
        super().__init__()
        self.clip_encoder = FrozenCLIPEmbedder(clip_version, device, max_length=clip_max_length)
        self.t5_encoder = FrozenT5Embedder(t5_version, device, max_length=t5_max_length)
        logger.info("%s has %.2f M parameters, %s comes with %.2f M params.", type(self.clip_encoder).__name__,
                    count_params(self.clip_encoder) * 1e-6, type(self.t5_encoder).__name__,
                    count_params(self.t5_encoder) * 1e-6)

    def forward(self, text: str | Sequence[str]) -> list[torch.Tensor]:
        """[CLIP embeddings [B, clip_max_length, 768], T5 embeddings [B, t5_max_length, d_model]]."""
        return [self.clip_encoder.encode(text), self.t5_encoder.encode(text)]

    def encode(self, text: str | Sequence[str]) -> list[torch.Tensor]:
        """Same as `forward`."""
        return self(text)
