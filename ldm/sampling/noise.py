"""Noise sources for sampling. `SeededNoise` makes every sample depend on its own seed only.

With per-sample seeds, sample i is bit-identical whether it is drawn alone or inside a batch:
its initial latent and every noise draw of a stochastic sampler come from its own generator.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


class GlobalNoise:
    """Noise from torch's global random number generator (the original behaviour)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise of the full shape, batch included."""
        return torch.randn(tuple(shape), device=self.device, dtype=dtype)


class SeededNoise:
    """One torch.Generator per sample, seeded by `seeds[i]`; draws are made on the CPU and moved.

    CPU draws make the noise identical on every device; the cost is one small copy per step.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        if len(seeds) == 0:
            raise ValueError("SeededNoise needs at least one seed")
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Noise of shape [B, ...] with B == len(seeds); row i comes from generator i."""
        shape = tuple(shape)
        if shape[0] != len(self.generators):
            raise ValueError(f"SeededNoise has {len(self.generators)} seeds but a batch of {shape[0]} was asked for")
        rows = [torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(rows).to(self.device, dtype)


def make_noise(seeds: Sequence[int] | None, device: torch.device | str) -> GlobalNoise | SeededNoise:
    """SeededNoise for the given seeds, or GlobalNoise when seeds is None."""
    return GlobalNoise(device) if seeds is None else SeededNoise(seeds, device)
