"""Loss of the VQ autoencoder (Esser et al. 2021, "Taming Transformers", eq. 4-7): L1 or L2 + LPIPS
reconstruction, the quantiser's codebook loss, and a PatchGAN switched on at `disc_start`."""
from __future__ import annotations

import torch

from ldm.modules.losses.adversarial import (  # noqa: F401 - re-exported at the original import path
    PerceptualGANLoss,
    adopt_weight,
    hinge_d_loss,
    hinge_d_loss_with_exemplar_weights,
    l1,
    l2,
    pixel_loss_fn,
    vanilla_d_loss,
)


def measure_perplexity(
    predicted_indices: torch.Tensor, n_embed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(perplexity, number of codes used) of a batch of code indices; perplexity = exp(entropy of code usage).

    Unused codes contribute nothing to either, so `n_embed` only serves to check the indices.
    """
    flat = predicted_indices.reshape(-1).long()
    if n_embed is not None and flat.numel() and int(flat.max()) >= n_embed:
        raise ValueError(f"code index {int(flat.max())} is out of range for n_classes={n_embed}")
    _, counts = torch.unique(flat, return_counts=True)
    probs = counts.float() / flat.numel()
    perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
    return perplexity, torch.tensor(float(counts.numel()), device=flat.device)


class VQLPIPSWithDiscriminator(PerceptualGANLoss):
    """Autoencoder loss for VQModel; `forward(codebook_loss, x, x_rec, optimizer_idx, global_step, ...)`.

    total = mean(pixel + perceptual_weight * LPIPS) + d_weight * disc_factor * g_loss + codebook_weight * codebook.
    With `predicted_indices`, the log also holds the code perplexity and the number of codes used.
    `perceptual_pretrained=False` builds LPIPS on a random backbone (tests without downloads).
    """

    def __init__(
        self,
        disc_start: int,
        codebook_weight: float = 1.0,
        pixelloss_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_ndf: int = 64,
        disc_loss: str = "hinge",
        n_classes: int | None = None,
        perceptual_loss: str = "lpips",
        pixel_loss: str = "l1",
        perceptual_pretrained: bool = True,
    ) -> None:
        if perceptual_loss != "lpips":
            raise ValueError(f"lossconfig.params.perceptual_loss must be 'lpips', got {perceptual_loss!r}")
        super().__init__(
            disc_start,
            disc_num_layers=disc_num_layers,
            disc_in_channels=disc_in_channels,
            disc_ndf=disc_ndf,
            disc_factor=disc_factor,
            disc_weight=disc_weight,
            perceptual_weight=perceptual_weight,
            use_actnorm=use_actnorm,
            disc_conditional=disc_conditional,
            disc_loss=disc_loss,
            perceptual_pretrained=perceptual_pretrained,
        )
        self.codebook_weight = codebook_weight
        self.pixel_weight = pixelloss_weight  # kept for config compatibility; unused, as in the original
        self.pixel_loss = pixel_loss_fn(pixel_loss)
        self.n_classes = n_classes

    def forward(
        self,
        codebook_loss: torch.Tensor | None,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        optimizer_idx: int,
        global_step: int,
        last_layer: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        split: str = "train",
        predicted_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, log) of the autoencoder (optimizer_idx 0) or the discriminator (optimizer_idx 1)."""
        self.check_optimizer_idx(optimizer_idx)
        if optimizer_idx == 1:
            return self.discriminator_loss(inputs, reconstructions, global_step, cond, split)

        if codebook_loss is None:
            codebook_loss = torch.zeros(1, device=inputs.device)
        rec_loss = self.pixel_loss(inputs.contiguous(), reconstructions.contiguous())
        p_loss = self.perceptual(inputs, reconstructions)
        if p_loss is not None:
            rec_loss = rec_loss + self.perceptual_weight * p_loss
        else:
            p_loss = torch.zeros(1, device=inputs.device)
        nll_loss = rec_loss.mean()

        g_loss, d_weight, disc_factor = self.generator_terms(
            nll_loss, reconstructions, global_step, last_layer, cond
        )
        loss = nll_loss + d_weight * disc_factor * g_loss + self.codebook_weight * codebook_loss.mean()
        log = {
            f"{split}/total_loss": loss.detach().clone(),
            f"{split}/quant_loss": codebook_loss.detach().mean(),
            f"{split}/nll_loss": nll_loss.detach(),
            f"{split}/rec_loss": rec_loss.detach().mean(),
            f"{split}/p_loss": p_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.tensor(float(disc_factor), device=inputs.device),
            f"{split}/g_loss": g_loss.detach(),
        }
        if predicted_indices is not None:
            with torch.no_grad():
                perplexity, cluster_usage = measure_perplexity(predicted_indices, self.n_classes)
            log[f"{split}/perplexity"] = perplexity
            log[f"{split}/cluster_usage"] = cluster_usage
        return loss, log
