"""PatchGAN discriminator used by the autoencoder losses."""
from ldm.modules.discriminator.model import ActNorm, NLayerDiscriminator, weights_init

__all__ = ["ActNorm", "NLayerDiscriminator", "weights_init"]
