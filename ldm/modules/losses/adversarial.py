"""Pieces shared by the autoencoder losses: discriminator losses, the warm-up switch, and a base module
holding the LPIPS distance, the PatchGAN and the adaptive generator weight (Esser et al. 2021,
"Taming Transformers for High-Resolution Image Synthesis", eq. 7)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.discriminator.model import NLayerDiscriminator, weights_init
from ldm.modules.losses.perceptual import build_lpips


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise absolute error."""
    return torch.abs(x - y)


def l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise squared error."""
    return (x - y) ** 2


PIXEL_LOSSES = {"l1": l1, "l2": l2}


def pixel_loss_fn(name: str):
    """The elementwise pixel loss `lossconfig.params.pixel_loss` names ('l1' or 'l2')."""
    if name not in PIXEL_LOSSES:
        raise ValueError(f"lossconfig.params.pixel_loss must be one of {sorted(PIXEL_LOSSES)}, got {name!r}")
    return PIXEL_LOSSES[name]



def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """`value` before step `threshold`, `weight` from then on (switches the GAN terms on at disc_start)."""
    return value if global_step < threshold else weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss (Lim & Ye 2017): 0.5 * (mean relu(1 - real) + mean relu(1 + fake))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss (Goodfellow et al. 2014): 0.5 * (mean softplus(-real) + mean softplus(fake))."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def hinge_d_loss_with_exemplar_weights(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Hinge loss with one weight per sample: per-sample patch means, averaged with `weights`."""
    if not weights.shape[0] == logits_real.shape[0] == logits_fake.shape[0]:
        raise ValueError("weights, logits_real and logits_fake need the same batch size")
    real = (weights * F.relu(1.0 - logits_real).mean(dim=[1, 2, 3])).sum() / weights.sum()
    fake = (weights * F.relu(1.0 + logits_fake).mean(dim=[1, 2, 3])).sum() / weights.sum()
    return 0.5 * (real + fake)


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


class PerceptualGANLoss(nn.Module):
    """Base of LPIPSWithDiscriminator and VQLPIPSWithDiscriminator: LPIPS, PatchGAN and their schedule.

    Subclasses compute their reconstruction term and call `generator_terms` (optimizer_idx 0) or
    `discriminator_loss` (optimizer_idx 1).
    """

    def __init__(
        self,
        disc_start: int,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_ndf: int = 64,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_loss: str = "hinge",
        perceptual_pretrained: bool = True,
    ) -> None:
        super().__init__()
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"lossconfig.params.disc_loss must be one of {sorted(DISC_LOSSES)}, got {disc_loss!r}")
        self.perceptual_weight = perceptual_weight
        if perceptual_weight > 0:
            self.perceptual_loss = build_lpips(pretrained=perceptual_pretrained)
        self.discriminator = NLayerDiscriminator(
            input_nc=disc_in_channels, ndf=disc_ndf, n_layers=disc_num_layers, use_actnorm=use_actnorm
        ).apply(weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_loss = DISC_LOSSES[disc_loss]
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional

    def train(self, mode: bool = True) -> PerceptualGANLoss:
        """Set training mode, except for the frozen LPIPS network, which stays in eval mode (no dropout)."""
        super().train(mode)
        if self.perceptual_weight > 0:
            self.perceptual_loss.eval()
        return self

    def perceptual(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor | None:
        """LPIPS distance per sample (B, 1, 1, 1), or None when perceptual_weight is 0."""
        if self.perceptual_weight <= 0:
            return None
        return self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())

    def logits(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Discriminator logits for `x`, concatenated with `cond` along channels when conditional."""
        if (cond is not None) != self.disc_conditional:
            raise ValueError(
                f"lossconfig.params.disc_conditional is {self.disc_conditional} but cond was "
                f"{'given' if cond is not None else 'not given'}"
            )
        if cond is not None:
            x = torch.cat((x, cond), dim=1)
        return self.discriminator(x.contiguous())

    def calculate_adaptive_weight(
        self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor | None = None
    ) -> torch.Tensor:
        """disc_weight * |grad nll| / (|grad g_loss| + 1e-4) at the decoder's last layer, clamped to [0, 1e4]."""
        if last_layer is None:
            raise ValueError("the adaptive GAN weight needs last_layer (the decoder's last weight, get_last_layer())")
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.discriminator_weight

    def generator_terms(
        self,
        nll_loss: torch.Tensor,
        reconstructions: torch.Tensor,
        global_step: int,
        last_layer: torch.Tensor | None,
        cond: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(g_loss, d_weight, disc_factor): the generator's adversarial loss and how much it counts now.

        Without gradients (validation) the adaptive weight cannot be computed and is 0.
        """
        g_loss = -torch.mean(self.logits(reconstructions, cond))
        if self.disc_factor > 0.0 and nll_loss.requires_grad and g_loss.requires_grad:
            d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer=last_layer)
        elif self.disc_factor > 0.0 and self.training and torch.is_grad_enabled():
            raise RuntimeError("the generator loss has no gradient in training mode; is the decoder frozen?")
        else:
            d_weight = torch.zeros((), device=g_loss.device)
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        return g_loss, d_weight, disc_factor

    def discriminator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        global_step: int,
        cond: torch.Tensor | None,
        split: str,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Discriminator loss on real inputs vs detached reconstructions, zero before disc_start, and its log."""
        logits_real = self.logits(inputs.detach(), cond)
        logits_fake = self.logits(reconstructions.detach(), cond)
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        log = {
            f"{split}/disc_loss": d_loss.detach().clone(),
            f"{split}/logits_real": logits_real.detach().mean(),
            f"{split}/logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, log

    @staticmethod
    def check_optimizer_idx(optimizer_idx: int) -> None:
        """optimizer_idx 0 is the autoencoder (generator) step, 1 the discriminator step."""
        if optimizer_idx not in (0, 1):
            raise ValueError(f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx}")
