"""SD 2's CPU options of txt2img: `--torchscript` (the UNet and the first-stage decoder traced with torch.jit),
`--ipex` (Intel Extension for PyTorch's `ipex.optimize`) and `--bf16` (bfloat16).

As SD 2's scripts/txt2img.py: the traced UNet becomes `DiffusionWrapper.scripted_diffusion_model` (the wrapper
calls it with its inputs positionally: x, t, then the context and y it has), the traced decoder replaces
`first_stage_model.decoder`; both are frozen with `torch.jit.optimize_for_inference`. Unlike SD 2, which traced at
the fixed shapes of its 768 model, the example inputs are the run's own shapes.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import torch

from ldm.errors import UserError

logger = logging.getLogger(__name__)


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bfloat16 natively (a CUDA GPU that supports it; a CPU with AVX512-BF16 / AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_note(device: torch.device) -> str | None:
    """The note for --bf16 on a device without native bfloat16 (it runs, emulated and slower than float32)."""
    if native_bf16(device):
        return None
    return (f"--bf16: this {device.type.upper()} has no native bfloat16 units; autocast emulates it, which is slower "
            "than float32 and changes the images slightly")


def ipex_optimize(model: Any, bf16: bool = False, flag: str = "--ipex") -> None:
    """ipex.optimize (level O1) the text encoder, the UNet and the first-stage decoder in channels-last layout, in
    place, with dtype bfloat16 for `bf16` (SD 2's --ipex)."""
    try:
        import intel_extension_for_pytorch as ipex
    except ImportError:
        raise UserError(f"{flag} needs Intel Extension for PyTorch (pip install intel-extension-for-pytorch), "
                        "which is not installed") from None
    dtype = torch.bfloat16 if bf16 else None
    text = getattr(model.cond_stage_model, "model", model.cond_stage_model)
    text = text.to(memory_format=torch.channels_last)
    ipex.optimize(text, level="O1", inplace=True)
    for owner, name in ((model.model, "diffusion_model"), (model.first_stage_model, "decoder")):
        module = getattr(owner, name).to(memory_format=torch.channels_last)
        ipex.optimize(module, level="O1", auto_kernel_selection=True, inplace=True, dtype=dtype)


def trace(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> torch.jit.ScriptModule:
    """`module` traced on `inputs` and frozen for inference."""
    return torch.jit.optimize_for_inference(torch.jit.trace(module.eval(), tuple(inputs), check_trace=False))


def torchscript(model: Any, shape: Sequence[int], cond: Any, autocast: contextlib.AbstractContextManager | None = None,
                flag: str = "--torchscript") -> None:
    """Trace the UNet at latents of `shape` (C, h, w) under the conditioning `cond` of one batch (SD 2:
    `scripted_diffusion_model`) and the decoder at one latent; a UNet with gradient checkpointing cannot be traced
    (SD 2's refusal)."""
    unet = model.model.diffusion_model
    if getattr(unet, "use_checkpoint", False):
        raise UserError(f"{flag}: the UNet uses gradient checkpointing (use_checkpoint: true), which tracing cannot "
                        "follow; set model.params.unet_config.params.use_checkpoint: false")
    roles = model.model.roles(cond)
    batch = next(iter(roles.values())).shape[0] if roles else 1
    device = model.device
    t = torch.full((batch,), model.num_timesteps - 1, dtype=torch.long, device=device)
    inputs = model.model.unet_inputs(torch.randn(batch, *shape, device=device), t, cond)
    decoder = model.first_stage_model.decoder
    z = torch.randn(1, decoder.conv_in.in_channels, *shape[1:], device=device)
    with torch.no_grad(), autocast or contextlib.nullcontext():
        model.model.scripted_diffusion_model = trace(unet, inputs)
        model.first_stage_model.decoder = trace(decoder, [z])
    logger.info("traced the UNet and the first-stage decoder with TorchScript")
