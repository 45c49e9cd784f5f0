"""The time-conditional UNet of latent diffusion (ADM-style, Dhariwal & Nichol 2021, with cross-attention).

Class names, constructor parameters and defaults, and state_dict keys follow the original
`ldm.modules.diffusionmodules.openaimodel` of latent-diffusion and Stable Diffusion v1/v2, so their
configs and checkpoints load unchanged.
"""
from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.attention import SpatialTransformer, attention
from ldm.modules.diffusionmodules.util import (
    NormSiLU,
    add_residual,
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)

logger = logging.getLogger(__name__)


def convert_module_to_f16(module: nn.Module) -> None:
    """Cast a layer's own floating-point parameters and buffers to float16 (used with `Module.apply`)."""
    module._apply(lambda t: t.half() if t.is_floating_point() else t, recurse=False)


def convert_module_to_f32(module: nn.Module) -> None:
    """Cast a layer's own floating-point parameters and buffers to float32 (used with `Module.apply`)."""
    module._apply(lambda t: t.float() if t.is_floating_point() else t, recurse=False)


class Timestep(nn.Module):
    """The sinusoidal embedding of (noise-level) timesteps as a module: t [N] -> [N, dim]."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """The [cos | sin] embedding of t (see `timestep_embedding`)."""
        return timestep_embedding(t, self.dim)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Apply the module to x given the timestep embedding emb."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential container that passes the timestep embedding and context to the children that take them."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Any = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling (spatial only for 3-D), optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Upsample expects {self.channels} channels, got {x.shape[1]}")
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """x2 downsampling by a strided 3x3 conv, or average pooling without conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            if self.channels != self.out_channels:
                raise ValueError("Downsample without conv cannot change the number of channels")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Downsample expects {self.channels} channels, got {x.shape[1]}")
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (additive, or scale-shift after the norm)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels), NormSiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            NormSiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *((1,) * (h.ndim - emb_out.ndim)))
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return add_residual(self.skip_connection(x), h)


class QKVAttentionLegacy(nn.Module):
    """Attention over a fused qkv tensor [N, H*3*C, T] laid out head by head (the original ADM order)."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def split(self, qkv: torch.Tensor, ch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as [N*H, C, T]."""
        bs, _, length = qkv.shape
        return qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        q, k, v = self.split(qkv, width // (3 * self.n_heads))
        # [N*H, C, T] -> [N*H, T, C]: one head per batch entry
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), heads=1)
        return out.transpose(1, 2).reshape(bs, -1, length)


class QKVAttention(QKVAttentionLegacy):
    """Attention over a fused qkv tensor [N, 3*H*C, T] split into q, k, v first (the new order)."""

    def split(self, qkv: torch.Tensor, ch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bs, _, length = qkv.shape
        return tuple(t.reshape(bs * self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))


class AttentionBlock(nn.Module):
    """Self-attention over the pixels of a feature map (no context), with a fused qkv 1x1 conv."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} is not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = QKVAttention(self.num_heads) if use_new_attention_order else QKVAttentionLegacy(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return add_residual(x, h).reshape(b, c, *spatial)


def _per_level(value: Any, levels: int, name: str) -> list:
    """An int broadcast to one entry per resolution level, or a list checked to have one per level."""
    if isinstance(value, int):
        return [value] * levels
    values = list(value)
    if len(values) != levels:
        raise ValueError(f"UNetModel: {name} needs one entry per level of channel_mult ({levels}), got {values}")
    return values


@dataclass(frozen=True)
class UNetBlocks:
    """Makes the UNet's blocks from its constructor settings: residual blocks, attention (ADM self-attention or a
    SpatialTransformer with cross-attention), down- and upsampling, with the head counts the original derives."""

    time_embed_dim: int
    dropout: float
    dims: int
    use_checkpoint: bool
    use_scale_shift_norm: bool
    num_heads: int
    num_head_channels: int
    legacy: bool
    use_spatial_transformer: bool
    transformer_depth: list[int]
    context_dim: int | list[int] | None
    disable_self_attentions: list[bool] | None
    disable_middle_self_attn: bool
    use_linear_in_transformer: bool
    use_new_attention_order: bool
    attention_resolutions: Sequence[int]
    num_attention_blocks: list[int] | None
    resblock_updown: bool
    conv_resample: bool

    def res(self, ch_in: int, ch_out: int, **kw: Any) -> ResBlock:
        """A residual block from ch_in to ch_out channels (kw: up / down)."""
        return ResBlock(ch_in, self.time_embed_dim, self.dropout, out_channels=ch_out, dims=self.dims,
                        use_checkpoint=self.use_checkpoint, use_scale_shift_norm=self.use_scale_shift_norm, **kw)

    def attn(self, ch: int, level: int | None, heads_for_legacy: int) -> nn.Module:
        """The attention block at `level` (None: the middle block), heads and width as the original derives them
        (including its `legacy` quirk); `heads_for_legacy` is num_heads, or num_heads_upsample on the way up."""
        if self.num_head_channels == -1:
            heads, dim_head = self.num_heads, ch // self.num_heads
        else:
            heads, dim_head = ch // self.num_head_channels, self.num_head_channels
        if self.legacy:
            dim_head = ch // heads if self.use_spatial_transformer else self.num_head_channels
        if not self.use_spatial_transformer:
            return AttentionBlock(
                ch, use_checkpoint=self.use_checkpoint,
                num_heads=heads_for_legacy if self.num_head_channels == -1 else heads,
                num_head_channels=dim_head, use_new_attention_order=self.use_new_attention_order,
            )
        middle = level is None
        disabled = self.disable_self_attentions is not None and not middle and self.disable_self_attentions[level]
        return SpatialTransformer(
            ch, heads, dim_head,
            depth=self.transformer_depth[-1] if middle else self.transformer_depth[level],
            context_dim=self.context_dim,
            disable_self_attn=self.disable_middle_self_attn if middle else bool(disabled),
            use_linear=self.use_linear_in_transformer,
            use_checkpoint=self.use_checkpoint,
        )

    def wants_attention(self, ds: int, level: int, index: int) -> bool:
        """Whether the index-th block of a level at downsampling ds has attention."""
        return ds in self.attention_resolutions and (
            self.num_attention_blocks is None or index < self.num_attention_blocks[level])

    def down(self, ch: int) -> nn.Module:
        """The x2 downsampling between levels: a ResBlock with resblock_updown, else a Downsample."""
        return self.res(ch, ch, down=True) if self.resblock_updown else Downsample(
            ch, self.conv_resample, dims=self.dims, out_channels=ch)

    def up(self, ch: int) -> nn.Module:
        """The x2 upsampling between levels: a ResBlock with resblock_updown, else an Upsample."""
        return self.res(ch, ch, up=True) if self.resblock_updown else Upsample(
            ch, self.conv_resample, dims=self.dims, out_channels=ch)


def _checked_options(levels: int, num_res_blocks: Any, transformer_depth: Any, context_dim: Any,
                     use_spatial_transformer: bool, num_heads: int, num_head_channels: int,
                     disable_self_attentions: Any, num_attention_blocks: Any, num_classes: Any,
                     adm_in_channels: int | None) -> tuple[list, list, Any, Any, Any]:
    """The UNet's options checked, and per-level ones as lists: (num_res_blocks, transformer_depth, context_dim,
    disable_self_attentions, num_attention_blocks)."""
    if use_spatial_transformer and context_dim is None:
        raise ValueError("UNetModel: use_spatial_transformer=True needs context_dim (the cross-attention width)")
    if context_dim is not None and not use_spatial_transformer:
        raise ValueError("UNetModel: context_dim is set but use_spatial_transformer is False; set it to True")
    if num_heads == -1 and num_head_channels == -1:
        raise ValueError("UNetModel: set either num_heads or num_head_channels")
    if context_dim is not None and not isinstance(context_dim, int):
        context_dim = list(context_dim)
    num_res_blocks = _per_level(num_res_blocks, levels, "num_res_blocks")
    transformer_depth = _per_level(transformer_depth, levels, "transformer_depth")
    if disable_self_attentions is not None:
        disable_self_attentions = _per_level(disable_self_attentions, levels, "disable_self_attentions")
    if num_attention_blocks is not None:
        num_attention_blocks = _per_level(num_attention_blocks, levels, "num_attention_blocks")
        if any(a > r for a, r in zip(num_attention_blocks, num_res_blocks)):
            raise ValueError(
                f"UNetModel: num_attention_blocks {num_attention_blocks} exceeds num_res_blocks {num_res_blocks}"
            )
    if num_classes is not None and not (isinstance(num_classes, int) or num_classes in ("continuous", "sequential")):
        raise ValueError(f"UNetModel: num_classes must be an int, 'continuous' or 'sequential', got {num_classes!r}")
    if num_classes == "sequential" and adm_in_channels is None:
        raise ValueError("UNetModel: num_classes='sequential' needs adm_in_channels")
    return num_res_blocks, transformer_depth, context_dim, disable_self_attentions, num_attention_blocks


class UNetTorso(nn.Module):
    """What UNetModel and its encoder half (EncoderUNetModel) share: the input blocks, the torso's float16
    conversion and the dtype the torso runs in.

    The torso is the input, middle and (for the full UNet) output blocks; the timestep / label embeddings and the
    output head stay as they are, as in guided-diffusion's mixed-precision UNet (Dhariwal & Nichol 2021).
    """

    TORSO = ("input_blocks", "middle_block", "output_blocks")

    def _torso(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.TORSO if hasattr(self, name)]

    def convert_to_fp16(self) -> None:
        """Convert the torso of the model to float16 (the embeddings and the output head stay in their dtype)."""
        for part in self._torso():
            part.apply(convert_module_to_f16)

    def convert_to_fp32(self) -> None:
        """Convert the torso of the model back to float32."""
        for part in self._torso():
            part.apply(convert_module_to_f32)

    def _build_input_blocks(self, blocks: UNetBlocks, dims: int) -> tuple[list[int], int, int]:
        """The encoder: the input conv, then per level its residual (+ attention) blocks and a downsampling.
        Returns the channels of every skip connection, the last width and the downsampling reached."""
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, self.in_channels, self.model_channels, 3, padding=1))]
        )
        self._feature_size = ch = self.model_channels
        input_block_chans, ds = [ch], 1
        for level, mult in enumerate(self.channel_mult):
            for nr in range(self.num_res_blocks[level]):
                layers: list[nn.Module] = [blocks.res(ch, mult * self.model_channels)]
                ch = mult * self.model_channels
                if blocks.wants_attention(ds, level, nr):
                    layers.append(blocks.attn(ch, level, self.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch
                input_block_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(blocks.down(ch)))
                input_block_chans.append(ch)
                ds *= 2
                self._feature_size += ch
        return input_block_chans, ch, ds

    def _compute_dtype(self) -> torch.dtype:
        """The dtype the torso runs in: `use_fp16`/`use_bf16` under autocast, else the torso's weights' dtype."""
        weight_dtype = self.input_blocks[0][0].weight.dtype
        device_type = self.input_blocks[0][0].weight.device.type
        if self.dtype != torch.float32 and torch.is_autocast_enabled(device_type):
            return self.dtype
        return weight_dtype

    def _timestep_features(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The sinusoidal timestep features, in the dtype of the timestep MLP (the torso's dtype under autocast)."""
        device_type = self.time_embed[0].weight.device.type
        dtype = self.dtype if self.dtype != torch.float32 and torch.is_autocast_enabled(device_type) else \
            self.time_embed[0].weight.dtype
        return timestep_embedding(timesteps, self.model_channels, repeat_only=False).to(dtype)


class UNetModel(UNetTorso):
    """The full UNet with timestep embedding, optional class / ADM embedding and cross-attention.

    Parameters and defaults are the original's; see the module docstring. Built level by level: embeddings,
    input blocks, middle block, output blocks, head (module names, order and state_dict keys as the original).
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
        num_classes: int | str | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        use_bf16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int | Sequence[int] = 1,
        context_dim: int | Sequence[int] | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
        disable_self_attentions: Sequence[bool] | None = None,
        num_attention_blocks: Sequence[int] | None = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        adm_in_channels: int | None = None,
    ):
        super().__init__()
        num_res_blocks, transformer_depth, context_dim, disable_self_attentions, attention_blocks = _checked_options(
            len(channel_mult), num_res_blocks, transformer_depth, context_dim, use_spatial_transformer, num_heads,
            num_head_channels, disable_self_attentions, num_attention_blocks, num_classes, adm_in_channels)
        num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.image_size, self.in_channels, self.model_channels = image_size, in_channels, model_channels
        self.out_channels, self.num_res_blocks = out_channels, num_res_blocks
        self.attention_resolutions, self.dropout = attention_resolutions, dropout
        self.channel_mult, self.conv_resample = channel_mult, conv_resample
        self.num_classes, self.use_checkpoint = num_classes, use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.bfloat16 if use_bf16 else torch.float32
        self.num_heads, self.num_head_channels = num_heads, num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.predict_codebook_ids = n_embed is not None
        blocks = UNetBlocks(
            model_channels * 4, dropout, dims, use_checkpoint, use_scale_shift_norm, num_heads, num_head_channels,
            legacy, use_spatial_transformer, transformer_depth, context_dim, disable_self_attentions,
            disable_middle_self_attn, use_linear_in_transformer, use_new_attention_order, attention_resolutions,
            attention_blocks, resblock_updown, conv_resample,
        )
        self._build_embeddings(blocks.time_embed_dim, adm_in_channels)
        input_block_chans, ch, ds = self._build_input_blocks(blocks, dims)
        self.middle_block = TimestepEmbedSequential(blocks.res(ch, ch), blocks.attn(ch, None, num_heads),
                                                    blocks.res(ch, ch))
        self._feature_size += ch
        ch = self._build_output_blocks(blocks, input_block_chans, ch, ds)
        self._build_head(ch, dims, n_embed)

    def _build_embeddings(self, time_embed_dim: int, adm_in_channels: int | None) -> None:
        """The timestep embedding MLP and, for class / ADM conditioning, the label embedding."""
        dim = time_embed_dim
        self.time_embed = nn.Sequential(linear(self.model_channels, dim), nn.SiLU(), linear(dim, dim))
        if isinstance(self.num_classes, int):
            self.label_emb = nn.Embedding(self.num_classes, dim)
        elif self.num_classes == "continuous":
            self.label_emb = nn.Linear(1, dim)
        elif self.num_classes == "sequential":
            self.label_emb = nn.Sequential(nn.Sequential(linear(adm_in_channels, dim), nn.SiLU(), linear(dim, dim)))

    def _build_output_blocks(self, blocks: UNetBlocks, input_block_chans: list[int], ch: int, ds: int) -> int:
        """The decoder: per level (deepest first) its residual (+ attention) blocks over the concatenated skip
        connections, the last one upsampling. Returns the last width."""
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(self.num_res_blocks[level] + 1):
                layers = [blocks.res(ch + input_block_chans.pop(), self.model_channels * mult)]
                ch = self.model_channels * mult
                if blocks.wants_attention(ds, level, i):
                    layers.append(blocks.attn(ch, level, self.num_heads_upsample))
                if level and i == self.num_res_blocks[level]:
                    layers.append(blocks.up(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch
        return ch

    def _build_head(self, ch: int, dims: int, n_embed: int | None) -> None:
        """The output projection (zero-initialised) and, with n_embed, the codebook-id predictor."""
        head = zero_module(conv_nd(dims, self.model_channels, self.out_channels, 3, padding=1))
        self.out = nn.Sequential(normalization(ch), NormSiLU(), head)
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(normalization(ch), conv_nd(dims, self.model_channels, n_embed, 1))

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        context: torch.Tensor | Sequence[torch.Tensor] | None = None,
        y: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Predict the model output for noisy input x at `timesteps`, with optional context and labels y."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(
                "UNetModel: pass class labels y exactly when the model is class-conditional "
                f"(num_classes={self.num_classes!r}, y {'given' if y is not None else 'missing'})"
            )
        if timesteps is None:
            raise ValueError("UNetModel.forward needs timesteps")
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        dtype = self._compute_dtype()
        t_emb = self._timestep_features(timesteps)
        emb = self.time_embed(t_emb)
        if self.num_classes is not None:
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"UNetModel: {y.shape[0]} labels for a batch of {x.shape[0]}")
            emb = emb + self.label_emb(y if isinstance(self.num_classes, int) else y.to(t_emb.dtype))
        emb = emb.to(dtype)
        context = _cast_context(context, dtype)
        hs = []
        h = x.type(dtype)
        if self.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last) and h.ndim == 4:
            h = h.contiguous(memory_format=torch.channels_last)  # ldm.acceleration.to_channels_last
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb, context)
        h = h.type(x.dtype)
        return self.id_predictor(h) if self.predict_codebook_ids else self.out(h)


def _cast_context(context: Any, dtype: torch.dtype) -> Any:
    """The cross-attention context (a tensor or a list of them) in the torso's dtype."""
    if isinstance(context, torch.Tensor):
        return context.to(dtype) if context.is_floating_point() else context
    if isinstance(context, (list, tuple)):
        return [_cast_context(c, dtype) for c in context]
    return context


# The encoder half lives in its own file (it builds on the classes above); served here under the original path.
_ENCODER_NAMES = ("EncoderUNetModel", "AttentionPool2d")


def __getattr__(name: str) -> Any:
    """Module attribute hook (PEP 562): EncoderUNetModel and AttentionPool2d from `encoder_unet.py`."""
    if name in _ENCODER_NAMES:
        from ldm.modules.diffusionmodules import encoder_unet

        return getattr(encoder_unet, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
