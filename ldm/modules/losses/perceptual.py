"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric") from the `lpips` package, with the VGG16 trunk the original LDM losses used.

The module is frozen and always in eval mode, and its state_dict has the keys of taming-transformers'
LPIPS (`scaling_layer.*`, `net.slice*.*`, `lin0..lin4.model.1.weight`), so published autoencoder
checkpoints load into `loss.perceptual_loss` unchanged.
"""
from __future__ import annotations

import logging
import re
import warnings
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

_ALIAS = re.compile(r"lins\.(\d+)\.")  # lpips.LPIPS registers each linear head twice: lin{i} and lins.{i}


class PerceptualLossUnavailable(RuntimeError):
    """The pretrained LPIPS backbone could not be loaded (usually: no internet to download it)."""


def _drop_aliases(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook: keep only the `lin{i}` names of the linear heads, as in taming's LPIPS."""
    for key in [k for k in state_dict if k.startswith(prefix) and _ALIAS.match(k[len(prefix):])]:
        del state_dict[key]


def _fill_aliases(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: provide `lins.{i}.*` from `lin{i}.*` so strict loading of taming keys works."""
    for i in range(len(module.lins)):
        head = f"{prefix}lin{i}."
        for key in [k for k in state_dict if k.startswith(head)]:
            state_dict.setdefault(f"{prefix}lins.{i}." + key[len(head):], state_dict[key])


def build_lpips(pretrained: bool = True, net: str = "vgg") -> nn.Module:
    """A frozen `lpips.LPIPS(net=net)`; `pretrained=False` uses a random trunk (for tests: no download).

    The linear heads always come with the `lpips` package. Raises PerceptualLossUnavailable, with the
    ways out, when the pretrained trunk cannot be fetched.
    """
    import lpips

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's `pretrained=` deprecation notice
            model = lpips.LPIPS(net=net, pnet_rand=not pretrained, verbose=False)
    except Exception as err:  # noqa: BLE001 - every way the download can fail ends in the same advice
        if not pretrained:
            raise
        backbone = "VGG16" if net == "vgg" else net
        raise PerceptualLossUnavailable(
            f"The LPIPS perceptual loss needs the ImageNet-pretrained {backbone} backbone, which torchvision could "
            f"not load ({type(err).__name__}: {err}). Either set `perceptual_weight: 0` in the loss config "
            "(model.params.lossconfig.params) to train without the perceptual term, put the torchvision weights "
            "into the torch hub cache ($TORCH_HOME/hub/checkpoints), or, in tests only, set "
            "`perceptual_pretrained: false` for a randomly initialised backbone."
        ) from None
    if not pretrained:
        logger.warning("LPIPS uses a randomly initialised %s backbone: perceptual distances are not meaningful", net)
    model.requires_grad_(False)
    model.eval()
    model.register_state_dict_post_hook(_drop_aliases)
    model.register_load_state_dict_pre_hook(_fill_aliases)
    return model
