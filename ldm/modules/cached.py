"""Batch tensors that are already what a frozen stage would compute, as a latent cache serves them.

A latent cache (`ldm.data.latent_cache`) stores the first stage's posterior moments and the frozen text encoder's
outputs once, so training skips both encoders. Its batches carry these marker types; `LatentDiffusion` checks for
them where it would encode (`encode_first_stage`, `get_learned_conditioning`) and passes them through. The markers
are plain torch.Tensor subclasses: indexing, `.to(device)`, `.float()`, `permute` and DataLoader workers keep them.
"""
from __future__ import annotations

import torch


class FirstStageLatent(torch.Tensor):
    """A first-stage latent before `scale_factor` (B x h x w x C, laid out like images), drawn from cached moments."""


class CachedConditioning(torch.Tensor):
    """The frozen conditioning stage's output for a batch (e.g. B x 77 x 768 text embeddings)."""


def plain(x: torch.Tensor) -> torch.Tensor:
    """The same data as a plain torch.Tensor (results of plain tensors stay plain)."""
    return x.as_subclass(torch.Tensor)
