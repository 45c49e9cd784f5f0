"""First-stage metrics: LPIPS from a local VGG16 file equals lpips' own model loading the same trunk, PSNR/SSIM are
torchmetrics' per-image values, reconstructions use the posterior mode / the quantised code, and missing VGG weights
are one line."""
import math

import lpips
import pytest
import torch
import torchvision

from ldm.evaluation.common import EvaluationError
from ldm.evaluation.first_stage import (build_lpips_metric, mean_scores, per_image_scores, reconstruct,
                                        resolve_vgg_weights)
from ldm.models.autoencoder import AutoencoderKL, VQModel

DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A randomly initialised torchvision VGG16 state dict (the format of vgg16-397923af.pth), only to prove the
    loading path: its distances are not meaningful."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), path)
    return str(path)


def test_lpips_with_a_local_trunk_equals_lpips_loading_the_same_trunk(vgg_file, monkeypatch):
    ours = build_lpips_metric(vgg_file, "--lpips-vgg-weights")
    trunk = torchvision.models.vgg16(weights=None)
    trunk.load_state_dict(torch.load(vgg_file, weights_only=True))
    # lpips' own pretrained path, with torchvision's download replaced by the same local weights
    monkeypatch.setattr(lpips.pretrained_networks.tv, "vgg16", lambda *args, **kwargs: trunk)
    reference = lpips.LPIPS(net="vgg", verbose=False).eval()
    generator = torch.Generator().manual_seed(1)
    x, y = (torch.rand(3, 3, 32, 32, generator=generator) * 2 - 1 for _ in range(2))
    with torch.no_grad():
        expected = reference(x, y).flatten()
    got = per_image_scores(x, y, ["lpips"], ours)["lpips"]
    torch.testing.assert_close(got, expected.double(), rtol=1e-5, atol=1e-7)
    assert (got > 0).all()
    assert per_image_scores(x, x, ["lpips"], ours)["lpips"].abs().max() < 1e-6


def test_missing_or_wrong_vgg_weights_are_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("LDM_LPIPS_VGG_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(EvaluationError) as err:
        resolve_vgg_weights()
    assert "\n" not in str(err.value)
    assert "--lpips-vgg-weights" in str(err.value) and "LDM_LPIPS_VGG_WEIGHTS" in str(err.value)
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(2)}, wrong)
    with pytest.raises(EvaluationError, match="--lpips-vgg-weights: .*wrong.pth' is not torchvision's vgg16"):
        build_lpips_metric(str(wrong), "--lpips-vgg-weights")
    monkeypatch.setenv("LDM_LPIPS_VGG_WEIGHTS", str(wrong))
    assert resolve_vgg_weights() == (str(wrong), "LDM_LPIPS_VGG_WEIGHTS")


def test_psnr_and_ssim_are_per_image_means():
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    generator = torch.Generator().manual_seed(2)
    x = torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1
    y = (x + 0.1 * torch.randn(4, 3, 16, 16, generator=generator)).clamp(-1, 1)
    values = per_image_scores(x, y, ["psnr", "ssim"])
    mse = (((x + 1) / 2 - (y + 1) / 2) ** 2).flatten(1).mean(1).double()
    torch.testing.assert_close(values["psnr"], 10 * torch.log10(1 / mse), rtol=1e-5, atol=1e-5)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0)((y + 1) / 2, (x + 1) / 2)
    means = mean_scores(values)
    assert means["ssim@4"] == pytest.approx(float(ssim), rel=1e-5)
    assert means["psnr@4"] == pytest.approx(float(values["psnr"].mean()))
    assert math.isinf(float(per_image_scores(x, x, ["psnr"])["psnr"][0]))


def test_reconstruct_uses_the_posterior_mode_and_the_quantised_code():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    kl = AutoencoderKL(DDCONFIG, {"target": "torch.nn.Identity"}, embed_dim=4).eval()
    vq = VQModel({**DDCONFIG, "double_z": False}, {"target": "torch.nn.Identity"}, n_embed=16, embed_dim=4).eval()
    with torch.no_grad():
        torch.testing.assert_close(reconstruct(kl, x), kl(x, sample_posterior=False)[0])
        torch.testing.assert_close(reconstruct(vq, x), vq(x)[0])
