"""Autoencoder training losses at their original import paths."""
from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator
from ldm.modules.losses.vqperceptual import VQLPIPSWithDiscriminator

__all__ = ["LPIPSWithDiscriminator", "VQLPIPSWithDiscriminator"]
