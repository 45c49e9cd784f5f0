"""Vector quantisation bottleneck of the VQ autoencoder (van den Oord et al. 2017, "Neural Discrete
Representation Learning"), with the index remapping and loss conventions of taming-transformers' VectorQuantizer2."""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)


class VectorQuantizer(nn.Module):
    """Replace each latent vector by its nearest codebook entry; gradients pass straight through to the encoder.

    `remap` names a .npy file of the codebook indices actually used; indices are then reported in that
    reduced vocabulary, and codes outside it become `unknown_index` ("random", "extra" or an int).
    """

    def __init__(
        self,
        n_e: int,
        e_dim: int,
        beta: float,
        remap: str | None = None,
        unknown_index: str | int = "random",
        sane_index_shape: bool = False,
        legacy: bool = True,
    ) -> None:
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.embedding = nn.Embedding(n_e, e_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_e, 1.0 / n_e)

        self.remap = remap
        if remap is not None:
            if not os.path.isfile(remap):
                raise FileNotFoundError(f"VectorQuantizer remap file {remap!r} does not exist (expected a .npy of used indices)")
            self.register_buffer("used", torch.as_tensor(np.load(remap), dtype=torch.long))
            self.re_embed = self.used.shape[0]
            if unknown_index == "extra":
                unknown_index = self.re_embed
                self.re_embed += 1
            elif unknown_index != "random" and not isinstance(unknown_index, int):
                raise ValueError(f"unknown_index must be 'random', 'extra' or an int, got {unknown_index!r}")
            self.unknown_index = unknown_index
            logger.info(
                "Remapping %d indices to %d indices. Using %s for unknown indices.", n_e, self.re_embed, unknown_index
            )
        else:
            self.re_embed = n_e
        self.sane_index_shape = sane_index_shape

    def remap_to_used(self, inds: torch.Tensor) -> torch.Tensor:
        """Codebook indices (batch, ...) → positions in `used`; indices not in `used` become the unknown index."""
        ishape = inds.shape
        if len(ishape) < 2:
            raise ValueError(f"remap_to_used expects indices with a batch axis, got shape {tuple(ishape)}")
        inds = inds.reshape(ishape[0], -1)
        used = self.used.to(inds)
        match = (inds[:, :, None] == used[None, None, :]).long()
        new = match.argmax(-1)
        unknown = match.sum(2) < 1
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, size=(int(unknown.sum()),), device=new.device)
        else:
            new[unknown] = self.unknown_index
        return new.reshape(ishape)

    def unmap_to_all(self, inds: torch.Tensor) -> torch.Tensor:
        """Positions in `used` (batch, ...) → codebook indices; the 'extra' unknown token maps to `used[0]`."""
        ishape = inds.shape
        if len(ishape) < 2:
            raise ValueError(f"unmap_to_all expects indices with a batch axis, got shape {tuple(ishape)}")
        inds = inds.reshape(ishape[0], -1).clone()
        used = self.used.to(inds)
        if self.re_embed > self.used.shape[0]:  # an extra token exists
            inds[inds >= self.used.shape[0]] = 0
        return used[inds].reshape(ishape)

    def _nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry for each row, by squared Euclidean distance."""
        weight = self.embedding.weight
        dist = z_flat.pow(2).sum(1, keepdim=True) + weight.pow(2).sum(1)[None, :] - 2.0 * z_flat @ weight.t()
        return torch.argmin(dist, dim=1)

    def _perplexity(self, indices: torch.Tensor) -> torch.Tensor:
        """exp(entropy) of the code usage histogram: the effective number of codes used."""
        probs = torch.bincount(indices, minlength=self.n_e).float() / indices.numel()
        return torch.exp(-torch.sum(probs * torch.log(probs + 1e-10)))

    def forward(
        self,
        z: torch.Tensor,
        temp: float | None = None,
        rescale_logits: bool = False,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, None, torch.Tensor]]:
        """Quantise BCHW `z`; returns (z_q, loss, (perplexity, min_encodings=None, indices)).

        The loss is the codebook + commitment loss of van den Oord et al. 2017, eq. 3 (legacy: beta
        weighs the codebook term instead, as taming-transformers did).
        """
        if temp not in (None, 1.0) or rescale_logits or return_logits:
            raise ValueError("temp, rescale_logits and return_logits exist only for interface compatibility with Gumbel quantisers")
        if z.shape[1] != self.e_dim:
            raise ValueError(f"VectorQuantizer expects {self.e_dim} channels (e_dim), got input of shape {tuple(z.shape)}")
        z = z.permute(0, 2, 3, 1).contiguous()  # BHWC
        indices = self._nearest(z.view(-1, self.e_dim))
        z_q = self.embedding(indices).view(z.shape)

        commitment = torch.mean((z_q.detach() - z) ** 2)
        codebook = torch.mean((z_q - z.detach()) ** 2)
        loss = commitment + self.beta * codebook if self.legacy else self.beta * commitment + codebook

        with torch.no_grad():
            perplexity = self._perplexity(indices)
        z_q = z + (z_q - z).detach()  # straight-through estimator
        z_q = z_q.permute(0, 3, 1, 2).contiguous()

        if self.remap is not None:
            indices = self.remap_to_used(indices.reshape(z.shape[0], -1)).reshape(-1, 1)
        if self.sane_index_shape:
            indices = indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (perplexity, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, int, int, int] | None) -> torch.Tensor:
        """Codebook vectors for `indices`; with `shape` = (batch, height, width, channel) they come back BCHW."""
        if self.remap is not None:
            if shape is None:
                raise ValueError("get_codebook_entry needs `shape` (batch, height, width, channel) when indices are remapped")
            indices = self.unmap_to_all(indices.reshape(shape[0], -1)).reshape(-1)
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


VectorQuantizer2 = VectorQuantizer
