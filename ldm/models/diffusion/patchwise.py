"""Patch-wise first stage and denoiser for images larger than a model was trained on (latent-diffusion's
`split_input_params`, as its super-resolution notebook sets it).

With `model.split_input_params` set (an attribute, as the original: set it to enable, delete it to disable),
`encode_first_stage` / `decode_first_stage` (when `patch_distributed_vq`) and `apply_model` cut their input into
overlapping `ks` x `ks` patches `stride` apart (torch's Unfold), run the network on each, and fold the outputs
back, each patch weighted by its pixels' distance to the patch border (`delta_border`, clipped to
[clip_min_weight, clip_max_weight]; with `tie_braker` also by the patch's distance to the image border) and
normalised by the folded weights, so overlapping patches blend smoothly and the weights sum to 1 at every pixel.
`vqf` is the first stage's factor: the decoder's patches are `ks * vqf` pixels, the encoder's `ks / vqf` latents.

    model.split_input_params = {"ks": (128, 128), "stride": (64, 64), "vqf": 4, "patch_distributed_vq": True,
                                "tie_braker": False, "clip_max_weight": 0.5, "clip_min_weight": 0.01,
                                "clip_max_tie_weight": 0.5, "clip_min_tie_weight": 0.01}

The UNet itself is convolutional: a latent larger than the training size can also be denoised whole
(`apply_model` without `split_input_params`); patches bound the memory and keep each window at the trained size.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

logger = logging.getLogger(__name__)

SPLIT_DEFAULTS = {"vqf": 1, "patch_distributed_vq": True, "tie_braker": False, "clip_max_weight": 0.5,
                  "clip_min_weight": 0.01, "clip_max_tie_weight": 0.5, "clip_min_tie_weight": 0.01}
Fold = tuple[nn.Fold, nn.Unfold, torch.Tensor, torch.Tensor]


def _pair(value: Any) -> tuple[int, int]:
    """An int or a pair as a pair of ints."""
    if isinstance(value, (int, float)):
        return int(value), int(value)
    first, second = value
    return int(first), int(second)


class PatchwiseMixin:
    """LatentDiffusion's patch-wise first stage and denoiser (see the module docstring)."""

    def _split_params(self) -> dict[str, Any] | None:
        """split_input_params with the original's defaults filled in, or None when not set."""
        params = getattr(self, "split_input_params", None)
        if params is None:
            return None
        if not isinstance(params, Mapping) or "ks" not in params or "stride" not in params:
            raise ValueError("split_input_params must be a dict with at least 'ks' and 'stride' (patch size and step)")
        return {**SPLIT_DEFAULTS, **params}

    def meshgrid(self, h: int, w: int) -> torch.Tensor:
        """The (y, x) index of every pixel of an h x w grid, [h, w, 2]."""
        y = torch.arange(0, h).view(h, 1, 1).repeat(1, w, 1)
        x = torch.arange(0, w).view(1, w, 1).repeat(h, 1, 1)
        return torch.cat([y, x], dim=-1)

    def delta_border(self, h: int, w: int) -> torch.Tensor:
        """Each pixel's normalised distance to the nearest border of an h x w grid: 0 at the border, 0.5 at the
        centre, [h, w]."""
        lower_right = torch.tensor([max(h - 1, 1), max(w - 1, 1)]).view(1, 1, 2)
        arr = self.meshgrid(h, w) / lower_right
        to_top_left = torch.min(arr, dim=-1, keepdim=True)[0]
        to_bottom_right = torch.min(1 - arr, dim=-1, keepdim=True)[0]
        return torch.min(torch.cat([to_top_left, to_bottom_right], dim=-1), dim=-1)[0]

    def get_weighting(self, h: int, w: int, Ly: int, Lx: int, device: torch.device) -> torch.Tensor:
        """The blending weight of every pixel of each of the Ly x Lx patches of size h x w, [1, h * w, Ly * Lx]:
        the clipped distance to the patch border (times the clipped distance of the patch to the image border
        with tie_braker)."""
        params = self._split_params() or SPLIT_DEFAULTS
        weighting = torch.clip(self.delta_border(h, w), params["clip_min_weight"], params["clip_max_weight"])
        weighting = weighting.view(1, h * w, 1).repeat(1, 1, Ly * Lx).to(device)
        if params["tie_braker"]:
            patch_weighting = torch.clip(self.delta_border(Ly, Lx), params["clip_min_tie_weight"],
                                         params["clip_max_tie_weight"])
            weighting = weighting * patch_weighting.view(1, 1, Ly * Lx).to(device)
        return weighting

    def get_fold_unfold(self, x: torch.Tensor, kernel_size: Any, stride: Any, uf: int = 1, df: int = 1) -> Fold:
        """(fold, unfold, normalization, weighting) for patches of x [B, C, H, W]: unfold cuts `kernel_size` patches
        `stride` apart; fold puts back patches scaled by `uf` (decoder: up) or `1 / df` (encoder: down);
        normalization [1, 1, H', W'] is the folded weighting; weighting [1, 1, kh', kw', L] weights each patch."""
        if uf > 1 and df > 1:
            raise NotImplementedError("get_fold_unfold scales patches up (uf) or down (df), not both")
        (kh, kw), (sh, sw) = _pair(kernel_size), _pair(stride)
        _, _, h, w = x.shape
        if kh > h or kw > w or (h - kh) % sh or (w - kw) % sw:
            raise ValueError(f"split_input_params: {kh}x{kw} patches {sh}x{sw} apart do not tile a {h}x{w} input "
                             "(every pixel must be covered: (side - ks) divisible by stride)")
        Ly, Lx = (h - kh) // sh + 1, (w - kw) // sw + 1
        unfold = nn.Unfold(kernel_size=(kh, kw), dilation=1, padding=0, stride=(sh, sw))
        if df > 1 and (kh % df or kw % df or sh % df or sw % df):
            raise ValueError(f"split_input_params: ks {kh}x{kw} and stride {sh}x{sw} must be multiples of vqf={df}")
        scale = (lambda v: v * uf) if df == 1 else (lambda v: v // df)
        out_k, out_s, out_size = (scale(kh), scale(kw)), (scale(sh), scale(sw)), (scale(h), scale(w))
        fold = nn.Fold(output_size=out_size, kernel_size=out_k, dilation=1, padding=0, stride=out_s)
        weighting = self.get_weighting(out_k[0], out_k[1], Ly, Lx, x.device).to(x.dtype)
        normalization = fold(weighting).view(1, 1, *out_size)
        return fold, unfold, normalization, weighting.view(1, 1, out_k[0], out_k[1], Ly * Lx)

    def _patch_geometry(self, x: torch.Tensor, params: dict[str, Any]) -> tuple[tuple[int, int], tuple[int, int]]:
        """ks and stride, each reduced to the input's sides when larger (as the original)."""
        (kh, kw), (sh, sw) = _pair(params["ks"]), _pair(params["stride"])
        h, w = x.shape[-2:]
        if kh > h or kw > w or sh > h or sw > w:
            logger.info("split_input_params: reducing the %dx%d patches / %dx%d stride to the %dx%d input", kh, kw,
                        sh, sw, h, w)
        return (min(kh, h), min(kw, w)), (min(sh, h), min(sw, w))

    def run_patchwise(self, x: torch.Tensor, fn: Callable[[torch.Tensor, int], torch.Tensor], params: dict[str, Any],
                      uf: int = 1, df: int = 1) -> torch.Tensor:
        """fn(patch, index) over the overlapping patches of x, the outputs blended back together."""
        ks, stride = self._patch_geometry(x, params)
        fold, unfold, normalization, weighting = self.get_fold_unfold(x, ks, stride, uf=uf, df=df)
        patches = unfold(x)
        patches = patches.view(patches.shape[0], -1, ks[0], ks[1], patches.shape[-1])
        out = torch.stack([fn(patches[..., i], i) for i in range(patches.shape[-1])], dim=-1)
        out = (out * weighting).view(out.shape[0], -1, out.shape[-1])
        return fold(out) / normalization

    def _patch_crop(self, value: Any, x: torch.Tensor, params: dict[str, Any]) -> Callable[[int], Any]:
        """A conditioning part for patch i: spatial maps of the latent's size cut like the latent, others whole."""
        if not (isinstance(value, torch.Tensor) and value.ndim == 4 and value.shape[-2:] == x.shape[-2:]):
            return lambda i: value
        ks, stride = self._patch_geometry(x, params)
        patches = nn.Unfold(kernel_size=ks, stride=stride)(value)
        patches = patches.view(patches.shape[0], -1, ks[0], ks[1], patches.shape[-1])
        return lambda i: patches[..., i]

    def patchwise_apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The denoiser run patch-wise (split_input_params): concat maps cut with the latent, contexts and vectors
        given whole to every patch."""
        params = self._split_params()
        if getattr(self, "cond_stage_key", None) == "coordinates_bbox":
            raise NotImplementedError("patch-wise apply_model with layouts (per-patch crop tokens) is not supported; "
                                      "delete split_input_params or sample the latent whole")
        roles = self.model.roles(cond) if cond is not None else {}
        parts = {role: self._patch_crop(value, x_noisy, params) for role, value in roles.items()}

        def denoise(patch: torch.Tensor, i: int) -> torch.Tensor:
            out = self.model(patch, t, cond={role: part(i) for role, part in parts.items()} if parts else None)
            return out[0] if isinstance(out, tuple) else out

        return self.run_patchwise(x_noisy, denoise, params)

    def patchwise_decode(self, z: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
        """Images of (unscaled) latents decoded patch-wise, or None when split_input_params asks for no patches."""
        params = self._split_params()
        if params is None or not params["patch_distributed_vq"]:
            return None
        return self.run_patchwise(z, lambda patch, i: decode(patch), params, uf=int(params["vqf"]))

    def patchwise_encode(self, x: torch.Tensor, encode: Callable[[torch.Tensor], Any]) -> Any:
        """The first stage's encoding of images patch-wise (a Gaussian posterior's parameters, or latents, blended),
        or None when split_input_params asks for no patches; records original_image_size as the original."""
        params = self._split_params()
        if params is None or not params["patch_distributed_vq"]:
            return None
        self.split_input_params["original_image_size"] = x.shape[-2:]
        gaussian = []

        def encode_patch(patch: torch.Tensor, i: int) -> torch.Tensor:
            out = encode(patch)
            if isinstance(out, DiagonalGaussianDistribution):
                gaussian.append(True)
                return out.parameters
            return out

        blended = self.run_patchwise(x, encode_patch, params, df=int(params["vqf"]))
        return DiagonalGaussianDistribution(blended) if gaussian else blended
