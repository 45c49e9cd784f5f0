"""First-stage (autoencoder) metrics: rFID, PSNR, SSIM (torchmetrics) and LPIPS (the `lpips` package).

Per image: PSNR = 10 log10(1 / MSE) on images in [0, 1], SSIM (Wang et al. 2004, Gaussian window 11, sigma 1.5)
and LPIPS (Zhang et al. 2018, VGG16 trunk with the package's calibrated linear heads), each averaged over the
images; rFID is the FID between the reconstructions and their inputs (LDM paper, Tab. 8).

LPIPS needs the ImageNet VGG16 trunk, which torchvision downloads; here it comes from a local file (torchvision's
`vgg16-397923af.pth` state dict): `--lpips-vgg-weights PATH`, `$LDM_LPIPS_VGG_WEIGHTS`, or the torch hub cache
when torchvision already put it there.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ldm.evaluation.common import LPIPS_VGG_ENV, EvaluationError, metric_name

logger = logging.getLogger(__name__)

VGG16_FILE = "vgg16-397923af.pth"  # the file torchvision's vgg16(pretrained=True) downloads
_SLICE_STARTS = (0, 4, 9, 16, 23, 30)  # lpips' vgg16 slices over torchvision's vgg16().features


def reconstruct(model: Any, images: torch.Tensor) -> torch.Tensor:
    """An autoencoder's reconstruction of images in [-1, 1]: decode(encode(x)), the KL posterior's mode (no sample),
    a VQ model's quantized code."""
    encoded = model.encode(images)
    if hasattr(encoded, "mode"):
        z = encoded.mode()
    elif isinstance(encoded, tuple):
        z = encoded[0]
    else:
        z = encoded
    return model.decode(z)


def per_image_scores(inputs: torch.Tensor, reconstructions: torch.Tensor, metrics: list[str],
                     lpips_model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """{psnr, ssim, lpips (those asked for): (B,) float64 values} of reconstructions against inputs in [-1, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    x = ((inputs.detach().float().clamp(-1, 1) + 1) / 2)
    y = ((reconstructions.detach().float().clamp(-1, 1) + 1) / 2)
    out: dict[str, torch.Tensor] = {}
    if "psnr" in metrics:
        out["psnr"] = peak_signal_noise_ratio(y, x, data_range=1.0, reduction="none", dim=(1, 2, 3))
    if "ssim" in metrics:
        out["ssim"] = structural_similarity_index_measure(y, x, data_range=1.0, reduction="none")
    if "lpips" in metrics:
        if lpips_model is None:
            raise ValueError("lpips asked for without an LPIPS model")
        with torch.no_grad():
            out["lpips"] = lpips_model(y * 2 - 1, x * 2 - 1).flatten()
    return {name: value.detach().double().cpu().reshape(len(x)) for name, value in out.items()}


def mean_scores(values: Mapping[str, torch.Tensor], suffix: str = "") -> dict[str, float]:
    """`psnr@n` etc.: the mean of each metric's per-image values."""
    return {metric_name(name, len(v), suffix): float(v.double().mean()) for name, v in values.items()}


def resolve_vgg_weights(path: str | os.PathLike | None = None, flag: str = "--lpips-vgg-weights") -> tuple[str, str]:
    """(file, where it came from) of the VGG16 trunk LPIPS needs: `path`, $LDM_LPIPS_VGG_WEIGHTS or the torch hub
    cache; a one-line EvaluationError when none exists."""
    for given, origin in ((path, flag), (os.environ.get(LPIPS_VGG_ENV), LPIPS_VGG_ENV)):
        if given:
            if not os.path.isfile(given):
                raise EvaluationError(f"{origin}: VGG16 weights file '{given}' does not exist")
            return os.fspath(given), origin
    hub = os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILE)
    if os.path.isfile(hub):
        return hub, "the torch hub cache"
    raise EvaluationError(f"LPIPS needs the ImageNet VGG16 backbone (torchvision's {VGG16_FILE}, a download): pass "
                          f"{flag} PATH or set {LPIPS_VGG_ENV} to a local copy of that state dict")


def vgg_to_lpips_trunk(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision vgg16 keys (`features.<i>.weight`) -> lpips' trunk keys (`slice<k>.<i>.weight`)."""
    out = {}
    for key, value in state.items():
        if not key.startswith("features."):
            continue  # the classifier is not part of the LPIPS trunk
        index, rest = key[len("features."):].split(".", 1)
        k = next(s for s in range(1, len(_SLICE_STARTS)) if int(index) < _SLICE_STARTS[s])
        out[f"slice{k}.{index}.{rest}"] = value
    return out


def build_lpips_metric(path: str, origin: str, device: torch.device | str = "cpu") -> nn.Module:
    """`lpips.LPIPS(net='vgg')` (linear heads shipped with the package) with its trunk loaded from a torchvision
    vgg16 state dict file; frozen, in eval mode."""
    import lpips

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read is the file's fault
        raise EvaluationError(f"{origin}: '{path}' is not a readable torch state dict ({type(err).__name__})") from err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's `pretrained=` deprecation notice
        model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    try:
        model.net.load_state_dict(vgg_to_lpips_trunk(state if isinstance(state, Mapping) else {}), strict=True)
    except (RuntimeError, StopIteration, ValueError) as err:
        raise EvaluationError(f"{origin}: '{path}' is not torchvision's vgg16 state dict "
                              f"({str(err).splitlines()[0]})") from err
    return model.requires_grad_(False).eval().to(device)
