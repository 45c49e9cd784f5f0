"""Small building blocks shared by the diffusion UNet and the diffusion process.

Module path and names follow the original `ldm.modules.diffusionmodules.util`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# the beta schedules live in ldm.sampling.schedule; they stay importable from here under their original path
from ldm.sampling.schedule import BETA_SCHEDULES, betas_for_alpha_bar, make_beta_schedule, spaced_timesteps  # noqa: F401
from ldm.util import instantiate_from_config, mean_flat  # noqa: F401 - mean_flat: the original import path


def make_ddim_timesteps(
    ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int, verbose: bool = True
) -> np.ndarray:
    """The DDIM sub-sequence of training timesteps ("uniform" or "quad"), ascending and shifted by one as in the
    original (the spacing itself is `ldm.sampling.schedule.spaced_timesteps`)."""
    if ddim_discr_method not in ("uniform", "quad"):
        raise ValueError(f"ddim_discr_method '{ddim_discr_method}' unknown; expected 'uniform' or 'quad'")
    return spaced_timesteps(ddim_discr_method, num_ddim_timesteps, num_ddpm_timesteps)[::-1].copy()


def make_ddim_sampling_parameters(
    alphacums: np.ndarray, ddim_timesteps: np.ndarray, eta: float, verbose: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """alphas, previous alphas and sigmas of a DDIM schedule (Song et al. 2021, eq. 16)."""
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([alphacums[0]] + alphacums[ddim_timesteps[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return sigmas, alphas, alphas_prev


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    """Gather a[t] per batch element and reshape to broadcast against a tensor of shape x_shape."""
    b = t.shape[0]
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def checkpoint(func: Callable, inputs: Sequence[Any], params: Iterable[torch.Tensor], flag: bool) -> Any:
    """Run func(*inputs), recomputing activations in the backward pass when `flag` is set.

    Uses torch's non-reentrant checkpointing, so parameters reached through closures (not only
    `params`) receive gradients; `params` is kept for signature compatibility with the original.
    """
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False
) -> torch.Tensor:
    """Sinusoidal timestep embeddings [cos | sin] of shape [N, dim] (Vaswani et al. 2017, sec. 3.5)."""
    if repeat_only:
        return timesteps[:, None].expand(-1, dim).clone()
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of a module in place and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Scale the parameters of a module in place and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    """The UNet's standard normalisation layer: 32-group GroupNorm in float32."""
    return GroupNorm32(32, channels)


class SiLU(nn.SiLU):
    """x * sigmoid(x) (kept as a named class for compatibility)."""


class NormSiLU(nn.SiLU):
    """The SiLU that follows a normalisation: without gradients it overwrites its input, the norm's fresh output
    that nothing else reads (GroupNorm + SiLU in one activation; with gradients an ordinary SiLU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x, inplace=not torch.is_grad_enabled())


def norm_silu(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """silu(norm(x)), in place on the norm's output when no gradient is recorded."""
    return F.silu(norm(x), inplace=not torch.is_grad_enabled())


def add_residual(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x + h, a block's residual connection; without gradients written into h (a block's fresh output: one
    activation less) where that gives exactly what x + h gives: the same shape, h already of the promoted dtype
    (under autocast a bf16 block output beside an fp32 residual would round the sum to bf16), and the same strides.
    The strides matter: x + h is laid out like x, h.add_(x) like h, and an attention block's output is often
    channels_last; a latent laid out so makes `torch.randn_like` draw the same numbers into other positions, so
    the same seed would no longer give the same noise (tests/data/test_laion_latent_cache.py caught that).
    Under torch.compile it is x + h: inductor plans its own buffers, and with the skip first it fuses the sum into
    the block's last convolution as an in-place accumulation (traced as h.add_(x) it chose the 1x1 skip convolution;
    the compiled SD UNet was then 1-2% behind diffusers', level with it after)."""
    if (torch.is_grad_enabled() or torch.compiler.is_compiling() or h.shape != x.shape or h.stride() != x.stride()
            or h.dtype != torch.promote_types(x.dtype, h.dtype)):
        return x + h
    return h.add_(x)


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1-D, 2-D or 3-D convolution."""
    layers = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in layers:
        raise ValueError(f"unsupported dimensions: {dims} (expected 1, 2 or 3)")
    return layers[dims](*args, **kwargs)


def linear(*args: Any, **kwargs: Any) -> nn.Linear:
    """A linear layer."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1-D, 2-D or 3-D average pooling layer."""
    layers = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in layers:
        raise ValueError(f"unsupported dimensions: {dims} (expected 1, 2 or 3)")
    return layers[dims](*args, **kwargs)


def noise_like(shape: Sequence[int], device: torch.device | str, repeat: bool = False) -> torch.Tensor:
    """Standard normal noise; with repeat, one draw shared across the batch."""
    if repeat:
        return torch.randn((1, *shape[1:]), device=device).repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(shape, device=device)


class HybridConditioner(nn.Module):
    """Two conditioners: one for concat conditioning, one for cross-attention."""

    def __init__(self, c_concat_config: Any, c_crossattn_config: Any):
        super().__init__()
        self.concat_conditioner = instantiate_from_config(c_concat_config)
        self.crossattn_conditioner = instantiate_from_config(c_crossattn_config)

    def forward(self, c_concat: Any, c_crossattn: Any) -> dict[str, list[torch.Tensor]]:
        return {
            "c_concat": [self.concat_conditioner(c_concat)],
            "c_crossattn": [self.crossattn_conditioner(c_crossattn)],
        }
