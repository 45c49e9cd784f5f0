"""Distributions over latents: the diagonal Gaussian posterior of the KL autoencoder, and Gaussian KL helpers."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch


class AbstractDistribution(ABC):
    """Interface of a latent distribution: draw a sample, or take its most likely value."""

    @abstractmethod
    def sample(self) -> torch.Tensor:
        """Draw one sample."""

    @abstractmethod
    def mode(self) -> torch.Tensor:
        """The most likely value."""


class DiracDistribution(AbstractDistribution):
    """A point mass at `value`: sampling and the mode both return it."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def sample(self) -> torch.Tensor:
        """The point itself."""
        return self.value

    def mode(self) -> torch.Tensor:
        """The point itself."""
        return self.value


class DiagonalGaussianDistribution(AbstractDistribution):
    """N(mean, diag(exp(logvar))) from `parameters` = cat([mean, logvar], dim=1); logvar is clamped to [-30, 20]."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        if parameters.shape[1] % 2 != 0:
            raise ValueError(
                f"parameters must stack mean and logvar along dim 1, so need an even size there; "
                f"got shape {tuple(parameters.shape)}"
            )
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample mean + std * eps, with eps drawn on the mean's device and dtype."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def _zero(self) -> torch.Tensor:
        """Per-sample zeros, the KL / NLL of a deterministic distribution."""
        return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) per sample, summed over dims 1-3; `other` defaults to N(0, I) (Kingma & Welling 2014, app. B)."""
        if self.deterministic:
            return self._zero()
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of `sample`, summed over `dims`."""
        if self.deterministic:
            return self._zero()
        log_two_pi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims))

    def mode(self) -> torch.Tensor:
        """The mean."""
        return self.mean


def normal_kl(
    mean1: torch.Tensor | float, logvar1: torch.Tensor | float, mean2: torch.Tensor | float, logvar2: torch.Tensor | float
) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)); at least one argument must be a tensor (broadcasts)."""
    like = next((obj for obj in (mean1, logvar1, mean2, logvar2) if isinstance(obj, torch.Tensor)), None)
    if like is None:
        raise TypeError("normal_kl needs at least one tensor argument among mean1, logvar1, mean2, logvar2")
    logvar1, logvar2 = (x if isinstance(x, torch.Tensor) else torch.tensor(x).to(like) for x in (logvar1, logvar2))
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )
