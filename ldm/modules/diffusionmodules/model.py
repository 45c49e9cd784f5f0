"""First-stage autoencoder networks: the convolutional Encoder and Decoder and their building blocks.

The layer names and nesting reproduce CompVis/latent-diffusion's ``model.py`` exactly, so the
published first-stage checkpoints (``first_stage_model.encoder.down.0.block.0.norm1.weight`` ...)
load without renaming. The architecture is the VQGAN / DDPM autoencoder of Esser et al. 2021,
"Taming Transformers for High-Resolution Image Synthesis", reused by Rombach et al. 2022.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import add_residual, norm_silu
from ldm.util import mapping_large_blocks, return_freed_memory

logger = logging.getLogger(__name__)

ATTN_TYPES = ("vanilla", "linear", "none")
# Stable Diffusion v2 names its memory-efficient attention path; here every vanilla block already
# uses scaled_dot_product_attention, so the name only selects the same block.
_ATTN_ALIASES = {"vanilla-xformers": "vanilla"}


def get_timestep_embedding(timesteps: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """Sinusoidal embedding of 1-D timesteps (Vaswani et al. 2017, sec. 3.5; as in DDPM), shape (N, embedding_dim)."""
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor, got shape {tuple(timesteps.shape)}")
    half_dim = embedding_dim // 2
    exponent = -math.log(10000) / (half_dim - 1)
    freqs = torch.exp(torch.arange(half_dim, dtype=torch.float32, device=timesteps.device) * exponent)
    args = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if embedding_dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish / SiLU activation, x * sigmoid(x)."""
    return x * torch.sigmoid(x)


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:  # noqa: N802 - original name
    """GroupNorm with eps 1e-6 and a learned affine, the only normalisation of the autoencoder."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, followed by a 3x3 convolution when `with_conv`."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Double the height and width of `x`."""
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.with_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """2x downsampling: zero-pad one row/column at the bottom/right, then a stride-2 3x3 conv (or 2x2 average pool)."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            # No padding inside the conv: the asymmetric pad is applied in forward.
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Halve the height and width of `x`."""
        if self.with_conv:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)
            return self.conv(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (norm, swish, conv) twice, an optional timestep bias, and a shortcut."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float,
        temb_channels: int = 512,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        """Residual update of `x`; `temb` (N, temb_channels) adds a per-channel bias when given."""
        h = self.conv1(norm_silu(self.norm1, x))
        if temb is not None:
            if not hasattr(self, "temb_proj"):
                raise ValueError("ResnetBlock was built with temb_channels=0 but was given a timestep embedding")
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = norm_silu(self.norm2, h)  # rebinding h here releases conv1's output before conv2 allocates its own
        h = self.conv2(self.dropout(h))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return add_residual(x, h)


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with 1x1-conv projections and a residual."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + proj_out(softmax(q k^T / sqrt(C)) v) over the H*W positions."""
        h = self.norm(x)
        b, c, height, width = x.shape

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, 1, c, height * width).transpose(2, 3)  # (B, 1 head, HW, C)

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.transpose(2, 3).reshape(b, c, height, width)
        return add_residual(x, self.proj_out(out))


class LinAttnBlock(nn.Module):
    """Single-head linear attention (Shen et al. 2021, "Efficient Attention"); like the original, no residual."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.heads = 1
        hidden = in_channels  # heads * dim_head with dim_head = in_channels
        self.to_qkv = nn.Conv2d(in_channels, hidden * 3, kernel_size=1, bias=False)
        self.to_out = nn.Conv2d(hidden, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """to_out(q^T softmax_n(k) v): keys are normalised over positions, queries are not."""
        b, _, height, width = x.shape
        q, k, v = self.to_qkv(x).reshape(b, 3, self.heads, -1, height * width).unbind(dim=1)
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, -1, height, width))


def make_attn(in_channels: int, attn_type: str = "vanilla") -> nn.Module:
    """The attention block named by `attn_type`: 'vanilla' (softmax), 'linear', or 'none' (identity)."""
    attn_type = _ATTN_ALIASES.get(attn_type, attn_type)
    logger.debug("making attention of type '%s' with %d in_channels", attn_type, in_channels)
    if attn_type == "vanilla":
        return AttnBlock(in_channels)
    if attn_type == "linear":
        return LinAttnBlock(in_channels)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(f"attn_type {attn_type!r} is not supported; expected one of {ATTN_TYPES}")


def _mid_stage(channels: int, dropout: float, attn_type: str) -> nn.Module:
    """The bottleneck both coders share: block_1, attn_1, block_2 at the lowest resolution."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(in_channels=channels, out_channels=channels, temb_channels=0, dropout=dropout)
    mid.attn_1 = make_attn(channels, attn_type=attn_type)
    mid.block_2 = ResnetBlock(in_channels=channels, out_channels=channels, temb_channels=0, dropout=dropout)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Apply a `_mid_stage` module."""
    return mid.block_2(mid.attn_1(mid.block_1(h, None)), None)


def _run_level(level: nn.Module, h: torch.Tensor, after_block: Callable[[], None] | None = None) -> torch.Tensor:
    """Apply one resolution level's residual blocks, each followed by its attention when the level has any (and by
    `after_block`, when given)."""
    has_attn = len(level.attn) > 0
    for i, block in enumerate(level.block):
        h = block(h, None)
        if has_attn:
            h = level.attn[i](h)
        if after_block is not None:
            after_block()
    return h


def _make_level(
    block_in: int, block_out: int, num_blocks: int, dropout: float, attn_type: str | None
) -> nn.Module:
    """A resolution level: `num_blocks` ResnetBlocks (`block`) and, if `attn_type`, one attention after each (`attn`)."""
    level = nn.Module()
    level.block = nn.ModuleList()
    level.attn = nn.ModuleList()
    for _ in range(num_blocks):
        level.block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=0, dropout=dropout))
        block_in = block_out
        if attn_type is not None:
            level.attn.append(make_attn(block_in, attn_type=attn_type))
    return level


def _set_common_attributes(
    coder: nn.Module,
    ch: int,
    ch_mult: Sequence[int],
    num_res_blocks: int,
    resolution: int,
    in_channels: int,
    attn_type: str,
    use_linear_attn: bool,
) -> str:
    """Set the plain attributes the original Encoder and Decoder both expose; return the effective attn_type."""
    coder.ch = ch
    coder.temb_ch = 0
    coder.num_resolutions = len(ch_mult)
    coder.num_res_blocks = num_res_blocks
    coder.resolution = resolution
    coder.in_channels = in_channels
    return "linear" if use_linear_attn else attn_type


class Encoder(nn.Module):
    """Image (N, in_channels, R, R) → latent moments (N, 2*z_channels or z_channels, R/2^(L-1), R/2^(L-1))."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        **ignore_kwargs: Any,
    ) -> None:
        super().__init__()
        attn_type = _set_common_attributes(self, ch, ch_mult, num_res_blocks, resolution, in_channels,
                                           attn_type, use_linear_attn)
        self.in_ch_mult = (1,) + tuple(ch_mult)

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res = resolution
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block_in = ch * self.in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            level_attn = attn_type if curr_res in attn_resolutions else None
            down = _make_level(block_in, block_out, num_res_blocks, dropout, level_attn)
            block_in = block_out
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)

        self.mid = _mid_stage(block_in, dropout, attn_type)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode images `x` into latent moments (or latents when double_z is False)."""
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            h = _run_level(down, h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(norm_silu(self.norm_out, h))


class Decoder(nn.Module):
    """Latent (N, z_channels, R/2^(L-1), R/2^(L-1)) → image (N, out_ch, R, R); `up[i]` works at level i."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        **ignorekwargs: Any,
    ) -> None:
        super().__init__()
        attn_type = _set_common_attributes(self, ch, ch_mult, num_res_blocks, resolution, in_channels,
                                           attn_type, use_linear_attn)
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        logger.info("Working with z of shape %s = %d dimensions.", self.z_shape, math.prod(self.z_shape))

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid_stage(block_in, dropout, attn_type)

        levels = []  # built from the lowest resolution up, stored so that index i is level i
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            level_attn = attn_type if curr_res in attn_resolutions else None
            up = _make_level(block_in, block_out, num_res_blocks + 1, dropout, level_attn)
            block_in = block_out
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Decode latents `z`; returns the pre-normalisation features instead when give_pre_end."""
        self.last_z_shape = z.shape
        if torch.is_grad_enabled():
            return self._decode(z, trim=False)
        with mapping_large_blocks():  # the sampler's working set, kept in the heap by a sampling script, goes back
            return self._decode(z, trim=True)

    def _decode(self, z: torch.Tensor, trim: bool) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for i_level in reversed(range(self.num_resolutions)):
            h = _run_level(self.up[i_level], h, return_freed_memory if trim else None)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
                if trim:
                    # The level's freed activations, small enough for glibc's heap, would stay resident beneath the
                    # next level's 4x larger ones: a 512x512 SD decode peaked ~150 MB higher without this.
                    return_freed_memory()
        if self.give_pre_end:
            return h
        h = self.conv_out(norm_silu(self.norm_out, h))
        return torch.tanh(h) if self.tanh_out else h


def _feather(length: int, ramp: int, before: bool, after: bool) -> torch.Tensor:
    """A 1-D blending weight: 1 inside, rising over `ramp` samples at a side that overlaps a neighbouring tile."""
    weight = torch.ones(length)
    ramp = min(ramp, length // 2)
    if ramp > 0:
        rise = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp
        if before:
            weight[:ramp] = rise
        if after:
            weight[length - ramp:] = rise.flip(0)
    return weight


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of `tile` covering `size` with at most `stride` between them (the last one flush)."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, stride)) + [size - tile]


def tiled_decode(decode: Any, z: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """Decode latents `z` tile by tile: latent tiles of `tile` x `tile` overlapping by `overlap`, each decoded alone
    and blended with linear ramps across the overlaps, so memory is bounded by one tile's activations (plus the
    output). The decoder's normalisation sees one tile at a time, so the result differs slightly from a full decode;
    wider overlaps hide the seams better."""
    _, _, height, width = z.shape
    if height <= tile and width <= tile:
        return decode(z)
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must lie in [0, tile {tile})")
    out = weight = None
    for top in _tile_starts(height, tile, tile - overlap):
        for left in _tile_starts(width, tile, tile - overlap):
            piece = decode(z[:, :, top:top + tile, left:left + tile])
            factor = piece.shape[-1] // min(tile, width)
            if out is None:
                out = piece.new_zeros(piece.shape[0], piece.shape[1], height * factor, width * factor)
                weight = piece.new_zeros(1, 1, height * factor, width * factor)
            rows = _feather(piece.shape[-2], overlap * factor, top > 0, top + tile < height)
            cols = _feather(piece.shape[-1], overlap * factor, left > 0, left + tile < width)
            mask = (rows[:, None] * cols[None, :]).to(piece)
            y, x = top * factor, left * factor
            out[..., y:y + piece.shape[-2], x:x + piece.shape[-1]] += piece * mask
            weight[..., y:y + piece.shape[-2], x:x + piece.shape[-1]] += mask
    return out / weight


def decode_in_parts(decode: Any, z: torch.Tensor, slicing: bool = False, tile: int | None = None,
                    overlap: int = 8) -> torch.Tensor:
    """`decode(z)`, one sample at a time with `slicing`, tile by tile (see `tiled_decode`) when `tile` is set."""
    def one(part: torch.Tensor) -> torch.Tensor:
        return decode(part) if tile is None else tiled_decode(decode, part, tile, overlap)

    if slicing and z.shape[0] > 1:
        return torch.cat([one(z[i:i + 1]) for i in range(z.shape[0])])
    return one(z)
