"""Classifier-free guidance (Ho & Salimans 2022), written once for every sampler.

The conditional and unconditional inputs are evaluated in one batch; the two outputs are combined
as uncond + scale * (cond - uncond), optionally rescaled towards the conditional output's standard
deviation (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Conditioning = Any  # a tensor, a list of tensors, a dict of those, or None


def concat_conditioning(uncond: Conditioning, cond: Conditioning) -> Conditioning:
    """Stack an unconditional and a conditional conditioning along the batch (dicts and lists per entry)."""
    if isinstance(cond, dict):
        if not isinstance(uncond, dict) or set(uncond) != set(cond):
            raise ValueError(
                f"unconditional_conditioning must be a dict with the keys of the conditioning {sorted(cond)}, "
                f"got {sorted(uncond) if isinstance(uncond, dict) else type(uncond).__name__}"
            )
        return {k: concat_conditioning(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, (list, tuple)):
        if not isinstance(uncond, (list, tuple)) or len(uncond) != len(cond):
            raise ValueError("unconditional_conditioning must be a list of the same length as the conditioning")
        return [concat_conditioning(u, c) for u, c in zip(uncond, cond)]
    if cond is None:
        return None
    if uncond.shape[1:] != cond.shape[1:]:
        raise ValueError(f"unconditional_conditioning has shape {tuple(uncond.shape)}, conditioning {tuple(cond.shape)}")
    return torch.cat([uncond, cond])


def combine(uncond_out: torch.Tensor, cond_out: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """uncond + scale * (cond - uncond), blended with its std-rescaled version by `rescale` in [0, 1]."""
    guided = uncond_out + scale * (cond_out - uncond_out)
    if rescale > 0:
        dims = list(range(1, cond_out.ndim))
        factor = cond_out.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
        guided = rescale * guided * factor + (1 - rescale) * guided
    return guided


def guided_model_fn(
    model_fn: Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor],
    cond: Conditioning,
    uncond: Conditioning | None,
    scale: float,
    rescale: float = 0.0,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Wrap model_fn(x, t, c) into f(x, t) that applies classifier-free guidance when scale != 1."""
    if uncond is None or scale == 1.0:
        return lambda x, t: model_fn(x, t, cond)
    both = concat_conditioning(uncond, cond)
    last: list[Any] = []  # (t, its version, cat([t, t])) of the last call: a Denoiser passes one t per level

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not last or last[0] is not t or last[1] != t._version:
            last[:] = [t, t._version, torch.cat([t, t])]
        out_uncond, out_cond = model_fn(torch.cat([x, x]), last[2], both).chunk(2)
        return combine(out_uncond, out_cond, scale, rescale)

    return fn
