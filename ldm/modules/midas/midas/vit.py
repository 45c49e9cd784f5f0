"""The ViT encoders of DPT (Ranftl et al. 2021, "Vision Transformers for Dense Prediction", sec. 3): timm's
ViT-L/16, ViT-B/16 and ViT-B/16 on a ResNet-50 stem ("hybrid"), read out at four depths and reassembled into
image-like feature maps at 1/4, 1/8, 1/16 and 1/32 of the input resolution.

The timm model sits at `pretrained.model` and the reassemble layers at `pretrained.act_postprocess{1..4}` with the
original Sequential indices (0 readout, 1 transpose, 2 unflatten, 3 1x1 conv, 4 resampling), so the keys are those of
the published DPT weights. Inputs of any size divisible by 32 work: the position embeddings are resized to the
token grid.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Slice(nn.Module):
    """Drop the readout (class) token(s): tokens from `start_index` on."""

    def __init__(self, start_index: int = 1) -> None:
        super().__init__()
        self.start_index = start_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N - start_index, C)."""
        return x[:, self.start_index:]


class AddReadout(nn.Module):
    """Add the readout token (the mean of two with a distillation token) to every patch token."""

    def __init__(self, start_index: int = 1) -> None:
        super().__init__()
        self.start_index = start_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens plus the readout token."""
        readout = (x[:, 0] + x[:, 1]) / 2 if self.start_index == 2 else x[:, 0]
        return x[:, self.start_index:] + readout.unsqueeze(1)


class ProjectReadout(nn.Module):
    """Concatenate the readout token to every patch token and project back: GELU(Linear(2C -> C)) (DPT eq. 4)."""

    def __init__(self, in_features: int, start_index: int = 1) -> None:
        super().__init__()
        self.start_index = start_index
        self.project = nn.Sequential(nn.Linear(2 * in_features, in_features), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N - start_index, C)."""
        tokens = x[:, self.start_index:]
        readout = x[:, :1].expand_as(tokens)
        return self.project(torch.cat((tokens, readout), dim=-1))


class Transpose(nn.Module):
    """x.transpose(dim0, dim1) as a module."""

    def __init__(self, dim0: int, dim1: int) -> None:
        super().__init__()
        self.dim0, self.dim1 = dim0, dim1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x with two dimensions swapped."""
        return x.transpose(self.dim0, self.dim1)


def get_readout_oper(vit_features: int, features: Sequence[int], use_readout: str,
                     start_index: int = 1) -> list[nn.Module]:
    """One readout operation per output level: 'ignore' (drop), 'add' or 'project' the class token."""
    if use_readout == "ignore":
        return [Slice(start_index) for _ in features]
    if use_readout == "add":
        return [AddReadout(start_index) for _ in features]
    if use_readout == "project":
        return [ProjectReadout(vit_features, start_index) for _ in features]
    raise ValueError(f"use_readout must be 'ignore', 'add' or 'project', got {use_readout!r}")


def _reassemble(readout: nn.Module, vit_features: int, grid: Sequence[int], out_features: int,
                resample: nn.Module | None) -> nn.Sequential:
    """readout, tokens -> channels, (the original's fixed-size unflatten), 1x1 conv to out_features, resampling."""
    layers = [readout, Transpose(1, 2), nn.Unflatten(2, torch.Size(grid)),
              nn.Conv2d(vit_features, out_features, kernel_size=1, stride=1, padding=0)]
    return nn.Sequential(*layers, *([resample] if resample is not None else []))


def _upsample(channels: int, factor: int) -> nn.Module:
    """A transposed conv that upsamples by `factor` (kernel = stride = factor)."""
    return nn.ConvTranspose2d(channels, channels, kernel_size=factor, stride=factor, padding=0, bias=True)


def _downsample(channels: int) -> nn.Module:
    """A 3x3 stride-2 conv."""
    return nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)


class ViTBackbone(nn.Module):
    """A timm ViT (at `model`) read out after the blocks `hooks`, with the DPT reassemble layers.

    For the hybrid ViT the first two levels are the ResNet stem's stage outputs (`act_postprocess1/2` are identities),
    unless `use_vit_only`.
    """

    def __init__(self, model: nn.Module, features: Sequence[int], hooks: Sequence[int], vit_features: int,
                 size: Sequence[int] = (384, 384), use_readout: str = "ignore", start_index: int = 1,
                 hybrid: bool = False, use_vit_only: bool = False) -> None:
        super().__init__()
        self.model = model
        self.hooks = list(hooks)
        self.start_index = start_index
        self.patch_size = [16, 16]
        self.hybrid_stages = hybrid and not use_vit_only
        readout = get_readout_oper(vit_features, features, use_readout, start_index)
        grid = [size[0] // 16, size[1] // 16]
        if self.hybrid_stages:
            self.act_postprocess1 = nn.Sequential(nn.Identity(), nn.Identity(), nn.Identity())
            self.act_postprocess2 = nn.Sequential(nn.Identity(), nn.Identity(), nn.Identity())
        else:
            self.act_postprocess1 = _reassemble(readout[0], vit_features, grid, features[0], _upsample(features[0], 4))
            self.act_postprocess2 = _reassemble(readout[1], vit_features, grid, features[1], _upsample(features[1], 2))
        self.act_postprocess3 = _reassemble(readout[2], vit_features, grid, features[2], None)
        self.act_postprocess4 = _reassemble(readout[3], vit_features, grid, features[3], _downsample(features[3]))

    def resized_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The position embeddings with the patch part resized (bilinear) from its square grid to grid_h x grid_w."""
        posemb = self.model.pos_embed
        tokens, patches = posemb[:, :self.start_index], posemb[0, self.start_index:]
        side = int(math.sqrt(len(patches)))
        patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=(grid_h, grid_w), mode="bilinear")
        patches = patches.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([tokens, patches], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The four feature maps (B, features[i], H / 2^(i+2), W / 2^(i+2)) of images x (B, 3, H, W)."""
        _, _, h, w = x.shape
        grid_h, grid_w = h // self.patch_size[1], w // self.patch_size[0]
        model, stage_outputs = self.model, []
        embed = model.patch_embed
        if hasattr(embed, "backbone"):  # hybrid: the ResNet stem and stages first
            x = embed.backbone.stem(x)
            for stage in embed.backbone.stages:
                x = stage(x)
                stage_outputs.append(x)
            x = embed.backbone.norm(x)
        x = embed.proj(x).flatten(2).transpose(1, 2)
        prefix = [model.cls_token.expand(x.shape[0], -1, -1)]
        if getattr(model, "dist_token", None) is not None:
            prefix.append(model.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat([*prefix, x], dim=1) + self.resized_pos_embed(grid_h, grid_w)
        x = model.norm_pre(model.pos_drop(x))
        block_outputs = {}
        for i, block in enumerate(model.blocks[: max(self.hooks) + 1]):
            x = block(x)
            block_outputs[i] = x
        if self.hybrid_stages:
            raw = [stage_outputs[0], stage_outputs[1], block_outputs[self.hooks[2]], block_outputs[self.hooks[3]]]
        else:
            raw = [block_outputs[i] for i in self.hooks]
        posts = (self.act_postprocess1, self.act_postprocess2, self.act_postprocess3, self.act_postprocess4)
        layers = []
        for layer, post in zip(raw, posts):
            layer = post[0:2](layer)
            if layer.ndim == 3:  # tokens -> the (B, C, grid_h, grid_w) map of this input's size
                layer = layer.reshape(layer.shape[0], layer.shape[1], grid_h, grid_w)
            layers.append(post[3:](layer))
        return layers[0], layers[1], layers[2], layers[3]


def forward_vit(pretrained: ViTBackbone, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four reassembled feature maps of a ViT backbone (the original's function form)."""
    return pretrained(x)


def _timm_vit(name: str) -> nn.Module:
    """A randomly initialised timm ViT."""
    import timm

    return timm.create_model(name, pretrained=False)


def _make_pretrained_vitl16_384(use_readout: str = "ignore", hooks: Sequence[int] | None = None) -> ViTBackbone:
    """DPT-Large's encoder: ViT-L/16 at 384, read out after blocks 5, 11, 17, 23."""
    return ViTBackbone(_timm_vit("vit_large_patch16_384"), features=[256, 512, 1024, 1024],
                       hooks=hooks or [5, 11, 17, 23], vit_features=1024, use_readout=use_readout)


def _make_pretrained_vitb16_384(use_readout: str = "ignore", hooks: Sequence[int] | None = None) -> ViTBackbone:
    """DPT-Base's encoder: ViT-B/16 at 384, read out after blocks 2, 5, 8, 11."""
    return ViTBackbone(_timm_vit("vit_base_patch16_384"), features=[96, 192, 384, 768],
                       hooks=hooks or [2, 5, 8, 11], vit_features=768, use_readout=use_readout)


def _make_pretrained_vitb_rn50_384(use_readout: str = "ignore", hooks: Sequence[int] | None = None,
                                   use_vit_only: bool = False) -> ViTBackbone:
    """DPT-Hybrid's encoder: ViT-B/16 on ResNet-50 stages (timm's vit_base_r50_s16_384, formerly
    vit_base_resnet50_384); levels 1-2 from the ResNet stages, 3-4 after blocks 8 and 11."""
    return ViTBackbone(_timm_vit("vit_base_r50_s16_384"), features=[256, 512, 768, 768],
                       hooks=hooks or [0, 1, 8, 11], vit_features=768, use_readout=use_readout, hybrid=True,
                       use_vit_only=use_vit_only)
