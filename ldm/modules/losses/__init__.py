"""Autoencoder training losses at their original import paths."""
from ldm.modules.losses.contperceptual import DummyLoss, LPIPSWithDiscriminator
from ldm.modules.losses.vqperceptual import VQLPIPSWithDiscriminator

__all__ = ["DummyLoss", "LPIPSWithDiscriminator", "VQLPIPSWithDiscriminator"]
