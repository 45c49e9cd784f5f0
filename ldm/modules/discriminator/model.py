"""PatchGAN discriminator (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial
Networks", sec. 3.2.2) with the layer layout of taming-transformers, so `main.N.*` keys load unchanged."""
from __future__ import annotations

import torch
from torch import nn


def weights_init(module: nn.Module) -> None:
    """DCGAN initialisation (Radford et al. 2016): conv weights ~ N(0, 0.02); batch-norm scale ~ N(1, 0.02), shift 0."""
    name = type(module).__name__
    if "Conv" in name:
        nn.init.normal_(module.weight.data, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(module.weight.data, 1.0, 0.02)
        nn.init.constant_(module.bias.data, 0.0)


class ActNorm(nn.Module):
    """Per-channel affine layer y = scale * (x + loc) whose first training batch sets loc and scale so that the
    output has zero mean and unit variance per channel (Kingma & Dhariwal 2018, "Glow", sec. 3.1)."""

    def __init__(
        self, num_features: int, logdet: bool = False, affine: bool = True, allow_reverse_init: bool = False
    ) -> None:
        super().__init__()
        if not affine:
            raise ValueError("ActNorm is always affine; affine=False is not supported")
        self.logdet = logdet
        self.allow_reverse_init = allow_reverse_init
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set loc = -mean and scale = 1/std of `x` (BCHW) per channel."""
        per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)
        mean = per_channel.mean(dim=1)
        std = per_channel.std(dim=1)
        self.loc.data.copy_(-mean.view(1, -1, 1, 1))
        self.scale.data.copy_(1.0 / (std.view(1, -1, 1, 1) + 1e-6))

    def _maybe_initialize(self, x: torch.Tensor, allowed: bool = True) -> None:
        """Data-dependent initialisation on the first batch seen in training mode."""
        if self.training and self.initialized.item() == 0:
            if not allowed:
                raise RuntimeError(
                    "ActNorm was asked to run in reverse before it was initialised; pass allow_reverse_init=True "
                    "or run a forward pass in training mode first"
                )
            self.initialize(x)
            self.initialized.fill_(1)

    def forward(
        self, x: torch.Tensor, reverse: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalise `x` (BCHW or BC); with `logdet` also return the log-determinant per sample."""
        if reverse:
            return self.reverse(x)
        flat = x.dim() == 2
        if flat:
            x = x[:, :, None, None]
        self._maybe_initialize(x)
        h = self.scale * (x + self.loc)
        if flat:
            h = h[:, :, 0, 0]
        if not self.logdet:
            return h
        logdet = x.shape[2] * x.shape[3] * torch.log(self.scale.abs()).sum()
        return h, logdet * torch.ones(x.shape[0], device=x.device, dtype=x.dtype)

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        """Invert the affine map: x = y / scale - loc."""
        flat = y.dim() == 2
        if flat:
            y = y[:, :, None, None]
        self._maybe_initialize(y, allowed=self.allow_reverse_init)
        x = y / self.scale - self.loc
        return x[:, :, 0, 0] if flat else x


class NLayerDiscriminator(nn.Module):
    """PatchGAN: stride-2 4x4 convolutions with LeakyReLU(0.2), giving one real/fake logit per image patch.

    `n_layers` strided blocks are followed by a stride-1 block and a 1-channel output conv; the channel
    count doubles per block from `ndf`, capped at 8*ndf. Normalisation is BatchNorm (conv without bias)
    or ActNorm (conv with bias), as in taming-transformers.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False) -> None:
        super().__init__()
        norm_layer = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # batch norm has its own shift
        kw, padw = 4, 1
        layers: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):  # n_layers - 1 strided blocks, then one at stride 1
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, kernel_size=kw, stride=2 if n < n_layers else 1, padding=padw,
                          bias=use_bias),
                norm_layer(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, kernel_size=kw, stride=1, padding=padw))
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch logits (B, 1, h, w) for images `x` (B, input_nc, H, W)."""
        return self.main(x)
