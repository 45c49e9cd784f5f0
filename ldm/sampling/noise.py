"""Noise sources for sampling. `SeededNoise` makes every sample depend on its own seed only.

With per-sample seeds, sample i is bit-identical whether it is drawn alone or inside a batch:
its initial latent and every noise draw of a stochastic sampler come from its own generator.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


class GlobalNoise:
    """Noise from torch's global random number generator (the original behaviour).

    `draws_every_step`: the original LDM samplers (ddim, plms, ddpm) draw a step's noise at every step from this
    source and multiply it by zero where the step adds none (eta = 0, sigma = 0), as the original code does, so the
    global generator's stream -- and with it a masked run or a second batch from one seed -- is the original's.
    """

    draws_every_step = True

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise of the full shape, batch included."""
        return torch.randn(tuple(shape), device=self.device, dtype=dtype)

    def dropout(self, z: torch.Tensor, p: float) -> torch.Tensor:
        """`torch.nn.functional.dropout(z, p)`: the original samplers' `noise_dropout` mask, from the global generator."""
        return F.dropout(z, p=p)


class SeededNoise:
    """One torch.Generator per sample, seeded by `seeds[i]`; draws are made on the CPU and moved.

    CPU draws make the noise identical on every device; the cost is one small copy per step.
    """

    draws_every_step = False  # a step that adds no noise draws none: sample i stays independent of the step count

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

    def dropout(self, z: torch.Tensor, p: float) -> torch.Tensor:
        """z with a share p of its entries zeroed and the rest scaled by 1 / (1 - p), as `F.dropout`; row i's keep
        mask is a Bernoulli(1 - p) draw of generator i (the CPU mask F.dropout draws from the global generator)."""
        if z.shape[0] != len(self.generators):
            raise ValueError(f"SeededNoise has {len(self.generators)} seeds but a batch of {z.shape[0]} was asked for")
        if p >= 1:
            return torch.zeros_like(z)
        keep = torch.stack([torch.empty(z.shape[1:]).bernoulli_(1 - p, generator=g) for g in self.generators])
        return z * (keep / (1 - p)).to(z.device, z.dtype)


def make_noise(seeds: Sequence[int] | None, device: torch.device | str) -> GlobalNoise | SeededNoise:
    """SeededNoise for the given seeds, or GlobalNoise when seeds is None."""
    return GlobalNoise(device) if seeds is None else SeededNoise(seeds, device)



class BrownianTreeNoise:
    """Brownian-tree noise for SDE samplers: one `torchsde.BrownianTree` per sample, seeded by that sample's seed.

    `between(sigma, sigma_next, shape)` is the tree's increment W(sigma_next) - W(sigma) divided by
    sqrt(|sigma_next - sigma|): a standard normal draw per step, as k-diffusion's `BrownianTreeNoiseSampler` with
    a list of seeds gives, whose increments stay consistent when the steps change (a step split in two sums to the
    draw of the whole step), so a sampler's results converge as its step count grows (Li et al. 2020, "Scalable
    Gradients for Stochastic Differential Equations", the Brownian tree; Kidger et al. 2021, the Brownian
    interval). `randn` (the start latent, the inpainting noise) draws from per-sample generators exactly as
    `SeededNoise` with the same seeds. The trees live on the CPU in the dtype of the first draw, so the noise does
    not depend on the device, and span [sigma_min, sigma_max], which `bind` sets (samplers bind the positive
    levels of their step array). torchsde is imported only here.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu",
                 sigma_min: float | None = None, sigma_max: float | None = None):
        try:
            import torchsde
        except ImportError:
            raise ImportError("Brownian-tree noise (brownian=True) needs the torchsde package: pip install torchsde") \
                from None
        self._torchsde = torchsde
        self.seeded = SeededNoise(seeds, device)
        self.seeds, self.device = self.seeded.seeds, self.seeded.device
        self.span: tuple[float, float] | None = None
        if sigma_min is not None or sigma_max is not None:
            self.bind(sigma_min, sigma_max)
        self._trees: list = []
        self._tree_key: tuple | None = None

    draws_every_step = False

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Plain per-sample normal noise of shape [B, ...], the same as SeededNoise(seeds).randn."""
        return self.seeded.randn(shape, dtype)

    def dropout(self, z: torch.Tensor, p: float) -> torch.Tensor:
        """The dropout of SeededNoise with the same seeds."""
        return self.seeded.dropout(z, p)

    def bind(self, sigma_min: float, sigma_max: float) -> None:
        """Set the span of the trees: the smallest positive and the largest noise level a sampler visits."""
        lo, hi = float(sigma_min), float(sigma_max)
        if not 0 < lo < hi < math.inf:
            raise ValueError(f"a Brownian tree needs 0 < sigma_min < sigma_max < inf, got {lo}, {hi}")
        self.span = (lo, hi)

    def between(self, sigma: float, sigma_next: float, shape: Sequence[int], dtype: torch.dtype = torch.float32
                ) -> torch.Tensor:
        """(W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|) for each sample: shape [B, ...], unit variance."""
        shape = tuple(shape)
        if shape[0] != len(self.seeds):
            raise ValueError(f"BrownianTreeNoise has {len(self.seeds)} seeds but a batch of {shape[0]} was asked for")
        a, b = float(sigma), float(sigma_next)
        lo, hi, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        with warnings.catch_warnings():  # torchsde warns when an end point sits a float rounding outside its span
            warnings.filterwarnings("ignore", message="Should have t[ab]", category=UserWarning)
            w = torch.stack([tree(lo, hi) for tree in self._trees_for(shape[1:], dtype)])
        return (w * (sign / math.sqrt(hi - lo))).to(self.device, dtype)

    def _trees_for(self, shape: tuple[int, ...], dtype: torch.dtype) -> list:
        """The per-sample trees for one sample shape, built on the first draw (again after `bind` changed the span)."""
        if self.span is None:
            raise ValueError("BrownianTreeNoise has no span: call bind(sigma_min, sigma_max) or pass both")
        key = (shape, dtype, self.span)
        if self._tree_key != key:
            w0 = torch.zeros(shape, dtype=dtype)
            lo, hi = self.span
            self._trees = [self._torchsde.BrownianTree(lo, w0, hi, entropy=seed) for seed in self.seeds]
            self._tree_key = key
        return self._trees


def brownian_noise(noise: Any, levels: Sequence[float], batch_size: int, device: torch.device | str
                   ) -> BrownianTreeNoise:
    """A BrownianTreeNoise bound to the positive finite `levels` of a sampler, made from `noise`: itself when it is
    one; the same seeds for a SeededNoise (so the start latent stays the same); one seed per sample from torch's
    global generator for GlobalNoise or None (k-diffusion draws its tree's seed the same way)."""
    if isinstance(noise, BrownianTreeNoise):
        tree = noise
    else:
        seeds = getattr(noise, "seeds", None)
        if seeds is None:
            seeds = torch.randint(0, 2**63 - 1, (batch_size,)).tolist()
        tree = BrownianTreeNoise(seeds, device)
    positive = [float(s) for s in levels if 0 < float(s) < math.inf]
    if len(set(positive)) > 1:  # with fewer, no step goes between two positive levels and nothing is drawn
        tree.bind(min(positive), max(positive))
    return tree
