"""Speed switches shared by main.py and the sampling scripts: torch.compile of the denoising UNet (with inductor's
on-disk cache, so a second run does not compile again), channels_last memory format, and a check for CPUs without
native bfloat16 arithmetic.

Each switch works on CPU and CUDA alike. `compile_unet` compiles the module in place (`nn.Module.compile`), so
state_dict keys, checkpoints and EMA weights are those of the eager model.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def inductor_cache_dir() -> str:
    """Inductor's cache directory: $TORCHINDUCTOR_CACHE_DIR, else `$LDM_CACHE_DIR/inductor` (~/.cache/ldm/inductor);
    set in the environment so inductor's compile workers use it too."""
    if not os.environ.get(CACHE_ENV):
        root = os.environ.get("LDM_CACHE_DIR") or os.path.join(Path.home(), ".cache", "ldm")
        os.environ[CACHE_ENV] = os.path.join(root, "inductor")
    return os.environ[CACHE_ENV]


def enable_compile_cache() -> str:
    """Turn on inductor's FX-graph and AOT-autograd caches in `inductor_cache_dir()`; returns the directory."""
    import torch._inductor.config as inductor_config

    cache = inductor_cache_dir()
    inductor_config.fx_graph_cache = True
    if hasattr(inductor_config, "autograd_cache"):
        inductor_config.autograd_cache = True
    try:
        import torch._functorch.config as functorch_config

        functorch_config.enable_autograd_cache = True
    except (ImportError, AttributeError):
        pass
    return cache


def unet_of(model: Any) -> nn.Module:
    """The denoising network of a DDPM / LatentDiffusion (`model.model.diffusion_model`), or the module itself."""
    wrapper = getattr(model, "model", None)
    return getattr(wrapper, "diffusion_model", model)


def compile_unet(model: Any, mode: str | None = None, dynamic: bool | None = False, freeze: bool = False) -> nn.Module:
    """Compile the model's UNet in place with torch.compile (inductor), the on-disk cache on; returns the UNet.

    The first call of each new input shape (and grad mode) compiles; later calls, and later runs with the cache,
    reuse the compiled code. `freeze` (sampling only: weights that never change afterwards) lets inductor fold the
    weights into the graph (its `freezing` option, applied to graphs run without gradients)."""
    unet = unet_of(model)
    cache = enable_compile_cache()
    if freeze:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    unet.compile(mode=mode, dynamic=dynamic)
    logger.info("torch.compile: %s compiled on first use (inductor cache %s)", type(unet).__name__, cache)
    return unet


def to_channels_last(module: nn.Module) -> nn.Module:
    """Convolution weights (and so their outputs) in channels_last memory format; state_dict keys unchanged."""
    return module.to(memory_format=torch.channels_last)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo; elsewhere oneDNN's
    own check)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        flags = None
    if flags is not None:
        return any(flag in flags for flag in BF16_CPU_FLAGS)
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_warning(device: torch.device | str) -> str | None:
    """One line for a bfloat16 run on a CPU without native bf16 (emulated there, many times slower than fp32);
    None where bf16 is native or the device is not a CPU."""
    if torch.device(device).type != "cpu" or cpu_has_native_bf16():
        return None
    return ("bf16 on this CPU is emulated (no AVX512-BF16 / AMX-BF16): expect it to be many times slower than fp32; "
            "use full precision (--precision full / 32) here")


def warn_if_emulated_bf16(device: torch.device | str) -> None:
    """Log `bf16_warning` when it applies."""
    message = bf16_warning(device)
    if message:
        logger.warning(message)


# parameters x latent pixels x UNet calls above which compiling pays for itself within one run on a CPU. Measured on
# the SD v1 UNet (860 M parameters, 2 cores): inductor halves a forward pass (1.7 -> 0.9 s at 32x32) after ~60-80 s
# of compiling, so it pays after ~90 calls at 32x32 and ~10 at 64x64: 860e6 * 1024 * 90 ~ 8e13.
COMPILE_PAYS_AT = 8e13


def compile_pays(model: Any, latent_pixels: int, unet_calls: int) -> bool:
    """Whether compiling the UNet is likely to save more time than it costs over `unet_calls` forward passes of
    `latent_pixels` latent pixels (the `--compile` default of the sampling scripts)."""
    n_params = sum(p.numel() for p in unet_of(model).parameters())
    return n_params * latent_pixels * unet_calls >= COMPILE_PAYS_AT


def accelerate(model: Any, compile: bool = False, channels_last: bool = False) -> Any:
    """Apply the switches to a model's UNet (channels_last first, then compile); returns the model."""
    if channels_last:
        to_channels_last(unet_of(model))
        logger.info("channels_last memory format for the UNet")
    if compile:
        compile_unet(model)
    return model
