"""Loss of the KL-regularised autoencoder: L1 + LPIPS reconstruction as a Laplace-like NLL with a learned
scale, a small KL to N(0, I), and a PatchGAN switched on at `disc_start` (Rombach et al. 2022,
"High-Resolution Image Synthesis with Latent Diffusion Models", sec. 3 and app. G)."""
from __future__ import annotations

import torch
from torch import nn

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses.adversarial import PerceptualGANLoss, pixel_loss_fn


class LPIPSWithDiscriminator(PerceptualGANLoss):
    """Autoencoder loss for AutoencoderKL; `forward(..., optimizer_idx=0)` is the autoencoder's, 1 the discriminator's.

    nll = (|x - x_rec| + perceptual_weight * LPIPS) / exp(logvar) + logvar, summed over pixels and averaged
    over the batch; total = weighted nll + kl_weight * KL + d_weight * disc_factor * g_loss.
    `pixel_loss: l2` (ours, as in the VQ loss) uses (x - x_rec)^2 for |x - x_rec|: it optimises PSNR directly.
    `perceptual_pretrained=False` builds LPIPS on a random backbone (tests without downloads).
    """

    def __init__(
        self,
        disc_start: int,
        logvar_init: float = 0.0,
        kl_weight: float = 1.0,
        pixelloss_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_loss: str = "hinge",
        perceptual_pretrained: bool = True,
        pixel_loss: str = "l1",
    ) -> None:
        super().__init__(
            disc_start,
            disc_num_layers=disc_num_layers,
            disc_in_channels=disc_in_channels,
            disc_factor=disc_factor,
            disc_weight=disc_weight,
            perceptual_weight=perceptual_weight,
            use_actnorm=use_actnorm,
            disc_conditional=disc_conditional,
            disc_loss=disc_loss,
            perceptual_pretrained=perceptual_pretrained,
        )
        self.kl_weight = kl_weight
        self.pixel_loss = pixel_loss_fn(pixel_loss)
        self.pixel_weight = pixelloss_weight  # kept for config compatibility; unused, as in the original
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init)

    def forward(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posteriors: DiagonalGaussianDistribution,
        optimizer_idx: int,
        global_step: int,
        last_layer: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        split: str = "train",
        weights: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, log) of the autoencoder (optimizer_idx 0) or the discriminator (optimizer_idx 1)."""
        self.check_optimizer_idx(optimizer_idx)
        if optimizer_idx == 1:
            return self.discriminator_loss(inputs, reconstructions, global_step, cond, split)

        rec_loss = self.pixel_loss(inputs.contiguous(), reconstructions.contiguous())
        p_loss = self.perceptual(inputs, reconstructions)
        if p_loss is not None:
            rec_loss = rec_loss + self.perceptual_weight * p_loss
        nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
        weighted_nll_loss = nll_loss if weights is None else weights * nll_loss
        batch = nll_loss.shape[0]
        weighted_nll_loss = weighted_nll_loss.sum() / batch
        nll_loss = nll_loss.sum() / batch
        kl_loss = posteriors.kl().sum() / batch

        g_loss, d_weight, disc_factor = self.generator_terms(
            nll_loss, reconstructions, global_step, last_layer, cond
        )
        loss = weighted_nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        log = {
            f"{split}/total_loss": loss.detach().clone(),
            f"{split}/logvar": self.logvar.detach().clone(),
            f"{split}/kl_loss": kl_loss.detach(),
            f"{split}/nll_loss": nll_loss.detach(),
            f"{split}/rec_loss": rec_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.tensor(float(disc_factor), device=inputs.device),
            f"{split}/g_loss": g_loss.detach(),
        }
        return loss, log


class DummyLoss(nn.Module):
    """The loss of a first stage used only for inference (`lossconfig` of published LDM checkpoints such as
    `models/ldm/inpainting_big`): no parameters and no state_dict entries, so the checkpoint's keys load unchanged;
    computing it is an error, since such a config was never meant to train its autoencoder."""

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        """Refuse: there is nothing to train against."""
        raise RuntimeError(
            "lossconfig ldm.modules.losses.contperceptual.DummyLoss is a placeholder for inference-only "
            "autoencoders and has no loss to compute; train with ldm.modules.losses.LPIPSWithDiscriminator "
            "(KL) or VQLPIPSWithDiscriminator (VQ) instead"
        )
