"""Autoencoder losses: values against hand computations, the GAN schedule, LPIPS plumbing, PatchGAN layout, ActNorm."""
from __future__ import annotations

import math
import urllib.error

import pytest
import torch
from torch import nn

from ldm.modules.discriminator.model import ActNorm, NLayerDiscriminator
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses import LPIPSWithDiscriminator, VQLPIPSWithDiscriminator
from ldm.modules.losses.adversarial import adopt_weight, hinge_d_loss, vanilla_d_loss
from ldm.modules.losses.perceptual import PerceptualLossUnavailable
from ldm.modules.losses.vqperceptual import measure_perplexity


def _images(seed: int, shape=(2, 3, 16, 16)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _kl_loss(**kwargs) -> LPIPSWithDiscriminator:
    torch.manual_seed(0)
    params = dict(disc_start=100, perceptual_weight=0.0, disc_num_layers=2)
    return LPIPSWithDiscriminator(**{**params, **kwargs}).eval()


def _decoded(x: torch.Tensor, scale: float = 0.7) -> tuple[torch.Tensor, nn.Parameter]:
    """A 'reconstruction' that depends on a parameter playing the decoder's last layer."""
    last = nn.Parameter(torch.tensor([scale]))
    return last * x.flip(-1), last


# ---------------------------------------------------------------------------------------------
# small functions
# ---------------------------------------------------------------------------------------------
def test_adopt_weight_switches_at_threshold():
    assert adopt_weight(1.0, 9, threshold=10) == 0.0
    assert adopt_weight(1.0, 10, threshold=10) == 1.0
    assert adopt_weight(0.3, 11, threshold=10) == 0.3
    assert adopt_weight(1.0, 3, threshold=10, value=0.25) == 0.25


def test_hinge_and_vanilla_d_loss_by_hand():
    real, fake = torch.tensor([0.5, 2.0]), torch.tensor([-2.0, 0.5])
    # hinge: relu(1 - real) = [0.5, 0], relu(1 + fake) = [0, 1.5]
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.5 * ((softplus(-0.5) + softplus(-2.0)) / 2 + (softplus(-2.0) + softplus(0.5)) / 2)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)


def test_measure_perplexity_counts_used_codes():
    perplexity, used = measure_perplexity(torch.tensor([[0, 0], [1, 1]]), 8)
    assert perplexity.item() == pytest.approx(2.0, rel=1e-5) and used.item() == 2
    perplexity, used = measure_perplexity(torch.tensor([3, 1, 4, 5]))
    assert perplexity.item() == pytest.approx(4.0, rel=1e-5) and used.item() == 4
    with pytest.raises(ValueError, match="n_classes"):
        measure_perplexity(torch.tensor([9]), 8)


# ---------------------------------------------------------------------------------------------
# LPIPSWithDiscriminator (KL autoencoder)
# ---------------------------------------------------------------------------------------------
def test_kl_loss_nll_with_logvar_and_kl_weight_by_hand():
    loss_fn = _kl_loss(logvar_init=0.5, kl_weight=0.1)
    x = _images(0)
    rec, last = _decoded(x)
    moments = _images(1, (2, 8, 4, 4))
    posterior = DiagonalGaussianDistribution(moments)
    loss, log = loss_fn(x, rec, posterior, 0, global_step=0, last_layer=last)

    abs_sum = (x - rec).abs().sum().item()
    nll = (abs_sum / math.exp(0.5) + 0.5 * x.numel()) / 2  # summed over pixels, averaged over the batch
    mean, logvar = moments.chunk(2, dim=1)
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum().item() / 2
    assert log["train/nll_loss"].item() == pytest.approx(nll, rel=1e-5)
    assert log["train/kl_loss"].item() == pytest.approx(kl, rel=1e-5)
    assert log["train/rec_loss"].item() == pytest.approx(abs_sum / x.numel(), rel=1e-5)
    assert log["train/logvar"].item() == 0.5
    assert log["train/disc_factor"].item() == 0.0  # before disc_start: no GAN term
    assert loss.item() == pytest.approx(nll + 0.1 * kl, rel=1e-5)
    assert log["train/total_loss"].item() == pytest.approx(loss.item())

    weighted, wlog = loss_fn(x, rec, posterior, 0, global_step=0, last_layer=last, weights=2.0)
    assert weighted.item() == pytest.approx(2 * nll + 0.1 * kl, rel=1e-5)
    assert wlog["train/nll_loss"].item() == pytest.approx(nll, rel=1e-5)  # logged unweighted
    keys = ("total_loss", "logvar", "kl_loss", "nll_loss", "rec_loss", "d_weight", "disc_factor", "g_loss")
    assert set(log) == {f"train/{k}" for k in keys}


def test_kl_loss_l2_pixel_loss_sums_squared_errors():
    loss_fn = _kl_loss(logvar_init=0.0, kl_weight=0.0, pixel_loss="l2")
    x = _images(0)
    rec, last = _decoded(x)
    posterior = DiagonalGaussianDistribution(_images(1, (2, 8, 4, 4)))
    _, log = loss_fn(x, rec, posterior, 0, global_step=0, last_layer=last)
    squared = ((x - rec) ** 2).sum().item()
    assert log["train/rec_loss"].item() == pytest.approx(squared / x.numel(), rel=1e-5)
    assert log["train/nll_loss"].item() == pytest.approx(squared / 2, rel=1e-5)  # per image, logvar 0
    with pytest.raises(ValueError, match="pixel_loss"):
        _kl_loss(pixel_loss="l3")


def test_adaptive_weight_and_gan_term_after_disc_start():
    loss_fn = _kl_loss(disc_start=5, disc_weight=0.5, kl_weight=0.0)
    with torch.no_grad():  # a stronger critic, so that the weight stays below its clamp
        loss_fn.discriminator.main[-1].weight.mul_(1000.0)
    x = _images(0)
    rec, last = _decoded(x)
    posterior = DiagonalGaussianDistribution(torch.zeros(2, 8, 4, 4))
    loss, log = loss_fn(x, rec, posterior, 0, global_step=5, last_layer=last, split="val")

    nll = (x - rec).abs().sum() / 2
    g_loss = -loss_fn.discriminator(rec).mean()
    g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    d_weight = (g_nll.norm() / (g_gan.norm() + 1e-4)).item() * 0.5
    assert log["val/d_weight"].item() == pytest.approx(d_weight, rel=1e-4)
    assert log["val/disc_factor"].item() == 1.0
    assert log["val/g_loss"].item() == pytest.approx(g_loss.item(), rel=1e-5)
    assert 0 < d_weight < 1e4 * 0.5
    assert loss.item() == pytest.approx(nll.item() + d_weight * g_loss.item(), rel=1e-4)


def test_adaptive_weight_is_clamped():
    loss_fn = _kl_loss(disc_start=0, disc_weight=0.5)
    with torch.no_grad():  # a constant discriminator: its gradient at the last layer vanishes
        loss_fn.discriminator.main[-1].weight.zero_()
    x = _images(0)
    rec, last = _decoded(x)
    _, log = loss_fn(x, rec, DiagonalGaussianDistribution(torch.zeros(2, 8, 4, 4)), 0, 0, last_layer=last)
    assert log["train/d_weight"].item() == pytest.approx(1e4 * 0.5)


def test_adaptive_weight_without_gradients_is_zero_and_needs_last_layer():
    loss_fn = _kl_loss(disc_start=0)
    x = _images(0)
    rec, last = _decoded(x)
    posterior = DiagonalGaussianDistribution(torch.zeros(2, 8, 4, 4))
    with torch.no_grad():
        _, log = loss_fn(x, rec, posterior, 0, 0, last_layer=last)
    assert log["train/d_weight"].item() == 0.0
    with pytest.raises(ValueError, match="last_layer"):
        loss_fn(x, rec, posterior, 0, 0)


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_discriminator_step_before_and_after_disc_start(kind):
    loss_fn = _kl_loss(disc_start=10, disc_loss=kind, disc_factor=0.8)
    x, rec = _images(0), _images(1)
    posterior = DiagonalGaussianDistribution(torch.zeros(2, 8, 4, 4))
    before, log_before = loss_fn(x, rec, posterior, 1, global_step=9)
    after, log_after = loss_fn(x, rec, posterior, 1, global_step=10, split="val")
    real, fake = loss_fn.discriminator(x), loss_fn.discriminator(rec)
    expected = (hinge_d_loss if kind == "hinge" else vanilla_d_loss)(real, fake).item()
    assert before.item() == 0.0 and log_before["train/disc_loss"].item() == 0.0
    assert after.item() == pytest.approx(0.8 * expected, rel=1e-5)
    assert set(log_after) == {"val/disc_loss", "val/logits_real", "val/logits_fake"}
    assert log_after["val/logits_real"].item() == pytest.approx(real.mean().item(), rel=1e-5)


def test_conditional_discriminator_and_bad_settings():
    loss_fn = _kl_loss(disc_start=0, disc_conditional=True, disc_in_channels=4)
    x, rec, cond = _images(0), _images(1), _images(2, (2, 1, 16, 16))
    posterior = DiagonalGaussianDistribution(torch.zeros(2, 8, 4, 4))
    d_loss, _ = loss_fn(x, rec, posterior, 1, 0, cond=cond)
    assert torch.isfinite(d_loss)
    with pytest.raises(ValueError, match="disc_conditional"):
        loss_fn(x, rec, posterior, 1, 0)
    with pytest.raises(ValueError, match="disc_loss"):
        LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0, disc_loss="wasserstein")
    with pytest.raises(ValueError, match="optimizer_idx"):
        loss_fn(x, rec, posterior, 2, 0, cond=cond)


# ---------------------------------------------------------------------------------------------
# VQLPIPSWithDiscriminator
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pixel_loss", ["l1", "l2"])
def test_vq_loss_pixel_and_codebook_terms(pixel_loss):
    torch.manual_seed(0)
    loss_fn = VQLPIPSWithDiscriminator(disc_start=100, perceptual_weight=0, codebook_weight=0.3,
                                       pixel_loss=pixel_loss, disc_num_layers=2, disc_ndf=8).eval()
    x = _images(0)
    rec, last = _decoded(x)
    codebook = torch.tensor(0.2)
    indices = torch.tensor([[0, 1], [1, 1]])
    loss, log = loss_fn(codebook, x, rec, 0, 0, last_layer=last, predicted_indices=indices)
    diff = x - rec
    pixel = (diff.abs() if pixel_loss == "l1" else diff**2).mean().item()
    assert log["train/nll_loss"].item() == pytest.approx(pixel, rel=1e-5)
    assert log["train/quant_loss"].item() == pytest.approx(0.2)
    assert loss.item() == pytest.approx(pixel + 0.3 * 0.2, rel=1e-5)
    p = torch.tensor([0.25, 0.75])
    assert log["train/perplexity"].item() == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-5)
    assert log["train/cluster_usage"].item() == 2
    assert loss_fn.discriminator.main[0].weight.shape[0] == 8  # disc_ndf

    no_codebook, _ = loss_fn(None, x, rec, 0, 0, last_layer=last)
    assert no_codebook.item() == pytest.approx(pixel, rel=1e-5)


def test_vq_loss_rejects_unknown_choices():
    with pytest.raises(ValueError, match="pixel_loss"):
        VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=0, pixel_loss="l3")
    with pytest.raises(ValueError, match="perceptual_loss"):
        VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=0, perceptual_loss="dists")


# ---------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lpips_loss() -> VQLPIPSWithDiscriminator:
    torch.manual_seed(0)
    return VQLPIPSWithDiscriminator(disc_start=0, perceptual_pretrained=False, disc_num_layers=2, disc_ndf=8)


def test_lpips_with_random_backbone_runs_and_is_frozen(lpips_loss):
    x, y = _images(0), _images(1)
    lp = lpips_loss.perceptual_loss
    assert lp(x, x).abs().max().item() < 1e-6
    distance = lp(x, y)
    assert distance.shape == (2, 1, 1, 1) and (distance > 0).all()
    assert not any(p.requires_grad for p in lp.parameters())
    lpips_loss.train()
    assert lpips_loss.discriminator.training and not lp.training  # the metric never drops out

    rec, last = _decoded(x)
    _, log = lpips_loss(torch.tensor(0.0), x, rec, 0, 0, last_layer=last)
    assert log["train/p_loss"].item() == pytest.approx(lp(x, rec).mean().item(), rel=1e-5)
    lpips_loss.eval()


def test_lpips_keys_are_those_of_the_original_checkpoints(lpips_loss):
    keys = [k for k in lpips_loss.state_dict() if k.startswith("perceptual_loss.")]
    heads = sorted(k for k in keys if ".lin" in k)
    assert heads == [f"perceptual_loss.lin{i}.model.1.weight" for i in range(5)]
    assert {"perceptual_loss.scaling_layer.shift", "perceptual_loss.net.slice1.0.weight",
            "perceptual_loss.net.slice5.28.weight"} <= set(keys)
    # a state dict with only the original names loads strictly, and reaches the lpips-package aliases too
    original = {k: v.clone() for k, v in lpips_loss.state_dict().items()}
    zeroed = {k: torch.zeros_like(v) if k.endswith("lin0.model.1.weight") else v for k, v in original.items()}
    try:
        lpips_loss.load_state_dict(zeroed, strict=True)
        assert lpips_loss.perceptual_loss.lins[0].model[1].weight.abs().sum() == 0
    finally:
        lpips_loss.load_state_dict(original)


def test_perceptual_weight_zero_builds_no_lpips():
    loss_fn = _kl_loss()
    assert not hasattr(loss_fn, "perceptual_loss")
    assert not any(k.startswith("perceptual_loss") for k in loss_fn.state_dict())


def test_missing_pretrained_backbone_gives_one_clear_error(monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models, "vgg16", offline)
    with pytest.raises(PerceptualLossUnavailable) as info:
        LPIPSWithDiscriminator(disc_start=0)
    message = str(info.value)
    assert "perceptual_weight: 0" in message and "perceptual_pretrained: false" in message
    assert "URLError" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained traceback


# ---------------------------------------------------------------------------------------------
# PatchGAN and ActNorm
# ---------------------------------------------------------------------------------------------
def test_patchgan_layout_matches_taming():
    disc = NLayerDiscriminator()
    shapes = {k: tuple(v.shape) for k, v in disc.state_dict().items()}
    assert shapes["main.0.weight"] == (64, 3, 4, 4) and shapes["main.0.bias"] == (64,)
    assert shapes["main.2.weight"] == (128, 64, 4, 4) and "main.2.bias" not in shapes  # batch norm follows
    assert shapes["main.3.running_mean"] == (128,)
    assert shapes["main.5.weight"] == (256, 128, 4, 4) and shapes["main.8.weight"] == (512, 256, 4, 4)
    assert shapes["main.11.weight"] == (1, 512, 4, 4) and shapes["main.11.bias"] == (1,)
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633
    assert disc(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 6, 6)  # three stride-2 convs, two stride-1

    act = {k: tuple(v.shape) for k, v in NLayerDiscriminator(use_actnorm=True).state_dict().items()}
    assert act["main.2.bias"] == (128,) and act["main.3.loc"] == (1, 128, 1, 1) and act["main.3.initialized"] == ()


def test_losses_initialise_the_discriminator_like_dcgan():
    disc = _kl_loss().discriminator
    conv = disc.main[5].weight
    assert conv.mean().abs().item() < 2e-3 and conv.std().item() == pytest.approx(0.02, rel=0.05)
    assert disc.main[3].weight.mean().item() == pytest.approx(1.0, abs=0.01)
    assert disc.main[3].bias.abs().sum().item() == 0.0


def test_actnorm_initialises_to_zero_mean_unit_variance():
    torch.manual_seed(0)
    norm = ActNorm(4)
    x = torch.randn(8, 4, 5, 5) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, 4, 1, 1) + 3.0
    y = norm(x)
    per_channel = y.transpose(0, 1).reshape(4, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(per_channel.std(1), torch.ones(4), atol=1e-4)
    assert norm.initialized.item() == 1
    assert torch.allclose(norm.reverse(y), x, atol=1e-5)
    loc = norm.loc.detach().clone()
    norm(x * 5)  # only the first batch initialises
    assert torch.equal(norm.loc, loc)

    flat = ActNorm(3, logdet=True)
    out, logdet = flat(torch.randn(6, 3) * 4)
    assert out.shape == (6, 3)
    assert torch.allclose(logdet, flat.scale.abs().log().sum().expand(6))

    untouched = ActNorm(2).eval()
    assert torch.equal(untouched(x[:, :2]), x[:, :2]) and untouched.initialized.item() == 0
    with pytest.raises(RuntimeError, match="allow_reverse_init"):
        ActNorm(2).reverse(x[:, :2])
