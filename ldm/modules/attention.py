"""Cross-attention transformer blocks of the latent-diffusion UNet.

Names, constructor parameters and state_dict keys follow the original `ldm.modules.attention`
(LDM and Stable Diffusion v1/v2). All attention goes through
`torch.nn.functional.scaled_dot_product_attention`.

Precision: the SD2 code upcast q·kᵀ and the softmax to float32 (`ATTN_PRECISION=fp32`) because its
naive einsum overflowed in fp16. PyTorch's SDPA kernels accumulate q·kᵀ and the softmax in float32
for fp16/bf16 inputs on every backend (flash, memory-efficient, CPU flash, and the math backend
unless `allow_fp16_bf16_reduction_math_sdp(True)`), so that upcast is built in here without
leaving the fused kernels. Setting `ATTN_PRECISION=fp32-inputs` additionally casts q, k, v to
float32 before the kernel, for bit-level investigations.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.diffusionmodules.util import add_residual, checkpoint, zero_module
from ldm.util import default

ATTN_PRECISION = os.environ.get("ATTN_PRECISION", "fp32")
# One matrix product for q, k, v of self-attention (k, v of cross-attention) instead of three; see
# `CrossAttention.fused`. Off by default (`LDM_FUSE_PROJECTIONS=1` turns it on for new layers): on CPU it measured
# no faster than three products (docs/benchmarks.md), and a differently shaped GEMM rounds differently, so a seed's
# image would change with the option.
FUSE_PROJECTIONS = os.environ.get("LDM_FUSE_PROJECTIONS", "0") == "1"


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-head scaled dot-product attention on [B, N, H*D] tensors (Vaswani et al. 2017, eq. 1).

    `mask` is a boolean [B, M] over the context tokens: False entries are not attended to.
    """
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out_dtype = q.dtype
    if ATTN_PRECISION == "fp32-inputs" and q.dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    if mask is not None:
        mask = mask.reshape(b, 1, 1, -1).to(device=q.device, dtype=torch.bool)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, inner).to(out_dtype)


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return x * F.gelu(gate)
        # inference: gelu's output is a fresh tensor, so the product is written into it (one activation less)
        return F.gelu(gate).mul_(x)


class FeedForward(nn.Module):
    """Transformer MLP: project in (GELU or GEGLU), dropout, project out."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = default(dim_out, dim)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def Normalize(in_channels: int) -> nn.GroupNorm:  # noqa: N802 - original name
    """GroupNorm(32, eps=1e-6) used at the input of a SpatialTransformer."""
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class CrossAttention(nn.Module):
    """Multi-head attention from `query_dim` tokens to a context (itself when context is None).

    With `fused` (default: `FUSE_PROJECTIONS`, off), the projections that read the same input run as one matrix
    product: q, k, v for self-attention, k, v for cross-attention. The parameters stay `to_q`, `to_k`, `to_v` (the
    original state_dict keys and modules). Without gradients their weights are re-pointed, on first use, into one
    packed tensor (no copy per call, no second copy of the weights); with gradients the packed weight is a
    concatenation of the parameters, so each still gets its gradient.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = default(context_dim, query_dim)
        self.scale = dim_head**-0.5
        self.heads = heads
        self.fused = FUSE_PROJECTIONS
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self._packed: dict[tuple[str, ...], torch.Tensor] = {}

    def packed_weight(self, names: tuple[str, ...]) -> torch.Tensor:
        """The weights of the projections `names` stacked along the output features."""
        weights = [getattr(self, name).weight for name in names]
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(w.requires_grad for w in weights)):
            return torch.cat(weights)  # compiled: inductor folds the concatenation of frozen weights
        packed = self._packed.get(names)
        if packed is None or not _are_views_of(weights, packed):
            with torch.no_grad(), torch.inference_mode(False):  # plain tensors: training may follow
                packed = torch.cat([w.detach() for w in weights])
                for w, part in zip(weights, packed.split([w.shape[0] for w in weights])):
                    w.data = part
            self._packed[names] = packed
        return packed

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.fused:
            context = default(context, x)
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        elif context is None:
            q, k, v = F.linear(x, self.packed_weight(("to_q", "to_k", "to_v"))).chunk(3, dim=-1)
        else:
            q = self.to_q(x)
            k, v = F.linear(context, self.packed_weight(("to_k", "to_v"))).chunk(2, dim=-1)
        return self.to_out(attention(q, k, v, self.heads, mask=mask))


    def _apply(self, fn, recurse: bool = True):
        self._packed = {}  # .to() / .half() give the weights new storage: pack again on next use
        return super()._apply(fn, recurse)


def _are_views_of(weights: list[torch.Tensor], packed: torch.Tensor) -> bool:
    """Whether the weights still lie, one after another, in `packed` (`.to()`, `.half()`, `load_state_dict(assign=
    True)` give them new storage; an in-place copy keeps it)."""
    offset = 0
    for w in weights:
        if (w.dtype != packed.dtype or w.device != packed.device or w.shape[1:] != packed.shape[1:]
                or w.data_ptr() != packed[offset:].data_ptr()):
            return False
        offset += w.shape[0]
    return offset == packed.shape[0]


def set_fused_projections(module: nn.Module, fused: bool) -> nn.Module:
    """Switch the fused q/k/v projections of every CrossAttention in `module` on or off; returns the module."""
    for layer in module.modules():
        if isinstance(layer, CrossAttention):
            layer.fused = fused
    return module


# SD2 exposes a second class name for the same layer.
MemoryEfficientCrossAttention = CrossAttention


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and a GEGLU feed-forward, each pre-normalised and residual."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        gated_ff: bool = True,
        checkpoint: bool = True,
        disable_self_attn: bool = False,
    ):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(
            query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout,
            context_dim=context_dim if disable_self_attn else None,
        )
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(
            query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = add_residual(x, self.attn1(self.norm1(x), context=context if self.disable_self_attn else None))
        x = add_residual(x, self.attn2(self.norm2(x), context=context))
        return add_residual(x, self.ff(self.norm3(x)))


def _per_block(value, depth: int, name: str) -> list:
    """Broadcast a single value (or a one-element list) to `depth` entries."""
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if len(values) == 1:
        values = values * depth
    if len(values) != depth:
        raise ValueError(f"{name} has {len(values)} entries but the transformer depth is {depth}")
    return values


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: norm, project in, blocks, project out, residual.

    `use_linear` selects the SD2 linear projections instead of 1x1 convolutions.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | Sequence[int] | None = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        use_checkpoint: bool = True,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"SpatialTransformer depth must be >= 1, got {depth}")
        context_dims = _per_block(context_dim, depth, "context_dim")
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = Normalize(in_channels)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dims[d],
                disable_self_attn=disable_self_attn, checkpoint=use_checkpoint,
            )
            for d in range(depth)
        )
        if use_linear:
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0))
        self.use_linear = use_linear

    def forward(self, x: torch.Tensor, context: torch.Tensor | Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        contexts = _per_block(context, len(self.transformer_blocks), "context")
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # b c h w -> b (h w) c
        if self.use_linear:
            x = self.proj_in(x)
        for block, ctx in zip(self.transformer_blocks, contexts):
            x = block(x, context=ctx)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return add_residual(x_in, x)
