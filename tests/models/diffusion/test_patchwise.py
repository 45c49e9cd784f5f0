"""Patch-wise first stage and denoiser (split_input_params, latent-diffusion's super-resolution notebook): the
border-distance weights, that the blended weights sum to 1, the fold / unfold shapes, patch-wise decode against the
full decode (exact where the decoder's receptive field stays inside a patch), patch-wise encode, and sampling latents
larger than the trained size, whole and in patches."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config
from tiny_ldm import model_config
from tiny_ldm import unet as tiny_unet

SPLIT = {"ks": (4, 4), "stride": (2, 2), "vqf": 4, "patch_distributed_vq": True, "tie_braker": False,
         "clip_max_weight": 0.5, "clip_min_weight": 0.01, "clip_max_tie_weight": 0.5, "clip_min_tie_weight": 0.01}


class LocalStage(nn.Module):
    """A first stage whose every output pixel sees a small neighbourhood: conv 3x3, x4 nearest upsampling, conv 1x1
    (decode); 4x4 average pooling and a 1x1 conv (encode)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.dec1, self.dec2 = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 3, 1)
        self.enc = nn.Conv2d(3, 8, 1)

    def decode(self, z):
        return self.dec2(F.interpolate(torch.tanh(self.dec1(z)), scale_factor=4, mode="nearest"))

    def encode(self, x):
        return DiagonalGaussianDistribution(self.enc(F.avg_pool2d(x, 4)))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = model_config("ldm.models.diffusion.ddpm.LatentDiffusion", tiny_unet(4, context_dim=None),
                       "__is_unconditional__", None)
    return instantiate_from_config(cfg).eval()


def test_delta_border_is_the_distance_to_the_nearest_edge(model):
    h, w = 5, 7
    d = model.delta_border(h, w)
    y, x = torch.meshgrid(torch.arange(h) / (h - 1), torch.arange(w) / (w - 1), indexing="ij")
    expected = torch.minimum(torch.minimum(y, x), torch.minimum(1 - y, 1 - x))
    torch.testing.assert_close(d, expected)
    assert d[0].max() == 0 and d[2, 3] == 0.5 and model.meshgrid(h, w)[3, 6].tolist() == [3, 6]


@pytest.mark.parametrize("tie_braker", [False, True])
def test_blending_weights_sum_to_one_everywhere(model, tie_braker):
    model.split_input_params = {**SPLIT, "tie_braker": tie_braker}
    try:
        x = torch.randn(1, 4, 8, 10)
        for uf, df in ((1, 1), (4, 1), (1, 2)):
            fold, unfold, normalization, weighting = model.get_fold_unfold(x, (4, 4), (2, 2), uf=uf, df=df)
            size = (8 * uf // df, 10 * uf // df)
            k = 4 * uf // df
            assert normalization.shape == (1, 1, *size) and weighting.shape == (1, 1, k, k, 3 * 4)
            assert unfold(x).shape == (1, 4 * 16, 12)  # 3 x 4 patches of 4 x 4
            ones = torch.ones(1, 1, k, k, 12) * weighting
            torch.testing.assert_close(fold(ones.view(1, k * k, 12)) / normalization, torch.ones(1, 1, *size))
        if not tie_braker:
            clipped = model.get_weighting(4, 4, 1, 1, "cpu").view(4, 4)
            assert clipped.min() == 0.01 and clipped.max() <= 0.5
        with pytest.raises(ValueError, match="do not tile a 8x9 input"):
            model.get_fold_unfold(torch.randn(1, 4, 8, 9), (4, 4), (2, 2))
    finally:
        del model.split_input_params


def test_patchwise_decode_equals_the_full_decode_where_the_receptive_field_allows(model):
    model.first_stage_model = LocalStage()
    z = torch.randn(2, 4, 8, 12)
    full = model.decode_first_stage(z)
    model.split_input_params = {**SPLIT, "ks": (6, 6)}
    try:
        patched = model.decode_first_stage(z)
    finally:
        del model.split_input_params
    assert patched.shape == full.shape == (2, 3, 32, 48)
    # a 3x3 conv on the latent: latents one away from every patch border are exact in each patch; the blend is an
    # average of exact values there and of nearly exact ones near the borders (weights 0.01 .. 0.5)
    error = (patched - full).abs()
    assert error.max() < 0.25 * full.abs().max() and error.mean() < 0.08 * full.abs().mean()
    # pixels whose every covering patch sees their whole receptive field are exact (rows 4-7: patch 0 alone covers
    # latent row 1; columns 4-7: only patch column 0)
    torch.testing.assert_close(patched[..., 4:8, 4:8], full[..., 4:8, 4:8])
    # blending beats plain averaging of the same patches (uniform weights)
    model.split_input_params = {**SPLIT, "ks": (6, 6), "clip_min_weight": 0.5}
    try:
        uniform = model.decode_first_stage(z)
    finally:
        del model.split_input_params
    assert error.mean() < (uniform - full).abs().mean()


def test_patchwise_encode_blends_the_posterior(model):
    model.first_stage_model = LocalStage()
    x = torch.randn(1, 3, 32, 32)
    model.split_input_params = {**SPLIT, "ks": (16, 16), "stride": (8, 8)}
    try:
        posterior = model.encode_first_stage(x)
        assert tuple(model.split_input_params["original_image_size"]) == (32, 32)
    finally:
        del model.split_input_params
    full = model.encode_first_stage(x)
    assert isinstance(posterior, DiagonalGaussianDistribution) and posterior.mean.shape == (1, 4, 8, 8)
    torch.testing.assert_close(posterior.mean, full.mean, atol=1e-5, rtol=1e-5)  # pooling + 1x1: patch-local


def test_larger_latents_sample_whole_and_in_patches(model):
    sampler = DDIMSampler(model)
    big, _ = sampler.sample(S=4, batch_size=1, shape=(4, 16, 16), verbose=False, seeds=[3])  # trained on 8x8
    assert big.shape == (1, 4, 16, 16) and torch.isfinite(big).all()
    model.split_input_params = {**SPLIT, "ks": (8, 8), "stride": (4, 4)}
    try:
        x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
        patched = model.apply_model(x, t, None)
        assert patched.shape == x.shape
        # one patch as big as the latent: the whole latent through the UNet
        model.split_input_params = {**SPLIT, "ks": (16, 16), "stride": (16, 16)}
        torch.testing.assert_close(model.apply_model(x, t, None), model.model(x, t), atol=1e-5, rtol=1e-5)
        tiled, _ = sampler.sample(S=4, batch_size=1, shape=(4, 16, 16), verbose=False, seeds=[3])
        torch.testing.assert_close(tiled, big, atol=1e-4, rtol=1e-4)
    finally:
        del model.split_input_params


def test_patchwise_denoiser_cuts_concat_maps_with_the_latent():
    torch.manual_seed(0)
    cfg = model_config("ldm.models.diffusion.ddpm.LatentDiffusion", tiny_unet(7, context_dim=None),
                       {"target": "torch.nn.Identity"}, "concat", cond_key="LR_image")
    model = instantiate_from_config(cfg).eval()
    x, low, t = torch.randn(2, 4, 16, 16), torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    seen = []
    forward = model.model.diffusion_model.forward
    model.model.diffusion_model.forward = lambda h, *a, **k: seen.append(h) or forward(h, *a, **k)
    model.split_input_params = {**SPLIT, "ks": (8, 8), "stride": (8, 8)}
    try:
        out = model.apply_model(x, t, {"c_concat": [low]})
    finally:
        del model.split_input_params
        model.model.diffusion_model.forward = forward
    assert out.shape == x.shape and len(seen) == 4
    torch.testing.assert_close(seen[1], torch.cat([x, low], 1)[..., :8, 8:])  # patch 1: top right, both cut alike
    torch.testing.assert_close(out[..., :8, 8:], model.apply_model(x[..., :8, 8:], t, {"c_concat": [low[..., :8, 8:]]}))
