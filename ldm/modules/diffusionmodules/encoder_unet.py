"""The encoder half of the UNet (ADM's noisy-image classifier, Dhariwal & Nichol 2021, sec. 4): the input blocks and
middle block of `UNetModel`, then a pooled head that maps the features to `out_channels` (class logits).

Served as `ldm.modules.diffusionmodules.openaimodel.EncoderUNetModel` (and `AttentionPool2d`), the original paths;
constructor parameters and state_dict keys are the original's.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.openaimodel import (
    QKVAttention,
    TimestepEmbedSequential,
    UNetBlocks,
    UNetModel,
    UNetTorso,
    _per_level,
)
from ldm.modules.diffusionmodules.util import conv_nd, linear, normalization, zero_module

logger = logging.getLogger(__name__)

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


class AttentionPool2d(nn.Module):
    """Attention pooling of a feature map, as CLIP's ResNet head (Radford et al. 2021): the mean feature attends over
    all positions (with a learned positional embedding); returns [N, output_dim]."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads_channels: int, output_dim: int | None = None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5)
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features of x [N, C, H, W] (H * W must equal spacial_dim ** 2)."""
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        if x.shape[-1] + 1 != self.positional_embedding.shape[1]:
            raise ValueError(f"AttentionPool2d: built for {self.positional_embedding.shape[1] - 1} positions, got a "
                             f"{tuple(x.shape)} feature map; image_size must match the input")
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        return self.c_proj(self.attention(self.qkv_proj(x)))[:, :, 0]


# UNetModel parameters an EncoderUNetModel has no use for: the original swallowed them (its classifier passes a
# diffusion model's unet_config); they are ignored here too, and anything else is an error
_UNET_ONLY = frozenset(inspect.signature(UNetModel.__init__).parameters) - {"self"}


class EncoderUNetModel(UNetTorso):
    """The half UNet with attention and timestep embedding: x [N, C, H, W] at timesteps [N] -> [N, out_channels].

    `pool`: 'adaptive' (norm, SiLU, global average, zero-initialised 1x1 conv), 'attention' (an AttentionPool2d,
    needs num_head_channels), 'spatial' / 'spatial_v2' (an MLP over the mean features of every block).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int | Sequence[int],
        attention_resolutions: Sequence[int],
        dropout: float = 0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
        **unet_only: Any,
    ):
        super().__init__()
        unknown = sorted(set(unet_only) - _UNET_ONLY)
        if unknown:
            raise TypeError(f"EncoderUNetModel: unknown parameter(s) {unknown}")
        if unet_only:
            logger.info("EncoderUNetModel: ignoring the UNetModel-only parameter(s) %s", sorted(unet_only))
        if pool not in POOLS:
            raise ValueError(f"EncoderUNetModel: pool must be one of {', '.join(POOLS)}, got {pool!r}")
        if pool == "attention" and num_head_channels == -1:
            raise ValueError("EncoderUNetModel: pool='attention' needs num_head_channels")
        self.in_channels, self.model_channels, self.out_channels = in_channels, model_channels, out_channels
        self.num_res_blocks = _per_level(num_res_blocks, len(channel_mult), "num_res_blocks")
        self.attention_resolutions, self.dropout = attention_resolutions, dropout
        self.channel_mult, self.conv_resample = channel_mult, conv_resample
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.num_heads, self.num_head_channels = num_heads, num_head_channels
        self.num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        # legacy=True: ADM attention blocks get num_heads / num_head_channels as given, as the original passes them
        blocks = UNetBlocks(
            time_embed_dim=model_channels * 4, dropout=dropout, dims=dims, use_checkpoint=use_checkpoint,
            use_scale_shift_norm=use_scale_shift_norm, num_heads=num_heads, num_head_channels=num_head_channels,
            legacy=True, use_spatial_transformer=False, transformer_depth=[1] * len(channel_mult), context_dim=None,
            disable_self_attentions=None, disable_middle_self_attn=False, use_linear_in_transformer=False,
            use_new_attention_order=use_new_attention_order, attention_resolutions=attention_resolutions,
            num_attention_blocks=None, resblock_updown=resblock_updown, conv_resample=conv_resample,
        )
        dim = blocks.time_embed_dim
        self.time_embed = nn.Sequential(linear(model_channels, dim), nn.SiLU(), linear(dim, dim))
        _, ch, ds = self._build_input_blocks(blocks, dims)
        self.middle_block = TimestepEmbedSequential(blocks.res(ch, ch), blocks.attn(ch, None, num_heads),
                                                    blocks.res(ch, ch))
        self._feature_size += ch
        self.pool = pool
        self.out = self._head(ch, dims, image_size // ds)

    def _head(self, ch: int, dims: int, final_size: int) -> nn.Sequential:
        """The pooled output head for self.pool."""
        if self.pool == "adaptive":
            return nn.Sequential(normalization(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                                 zero_module(conv_nd(dims, ch, self.out_channels, 1)), nn.Flatten())
        if self.pool == "attention":
            return nn.Sequential(normalization(ch), nn.SiLU(),
                                 AttentionPool2d(final_size, ch, self.num_head_channels, self.out_channels))
        if self.pool == "spatial":
            return nn.Sequential(nn.Linear(self._feature_size, 2048), nn.ReLU(), nn.Linear(2048, self.out_channels))
        return nn.Sequential(nn.Linear(self._feature_size, 2048), normalization(2048), nn.SiLU(),
                             nn.Linear(2048, self.out_channels))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Logits [N, out_channels] for the noisy input x at `timesteps`."""
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        dtype = self._compute_dtype()
        emb = self.time_embed(self._timestep_features(timesteps)).to(dtype)
        spatial = self.pool.startswith("spatial")
        means = []
        h = x.type(dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            if spatial:
                means.append(h.type(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.type(x.dtype).mean(dim=(2, 3)))
            return self.out(torch.cat(means, dim=-1))
        return self.out(h.type(x.dtype))
