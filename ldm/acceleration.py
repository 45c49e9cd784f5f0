"""SD 2's CPU options of txt2img: `--torchscript` (the UNet and the first-stage decoder traced with torch.jit),
`--ipex` (Intel Extension for PyTorch's `ipex.optimize`) and `--bf16` (bfloat16).

As SD 2's scripts/txt2img.py: the traced UNet becomes `DiffusionWrapper.scripted_diffusion_model` (the wrapper
calls it with its inputs positionally: x, t, then the context and y it has), the traced decoder replaces
`first_stage_model.decoder`; both are frozen with `torch.jit.optimize_for_inference`. Unlike SD 2, which traced at
the fixed shapes of its 768 model, the example inputs are the run's own shapes.

The speed switches shared by main.py and the sampling scripts live here too: torch.compile of the denoising UNet
(with inductor's on-disk cache, so a second run does not compile again), channels_last memory format, and a check
for CPUs without native bfloat16 arithmetic. Each works on CPU and CUDA alike; `compile_unet` compiles the module in
place (`nn.Module.compile`), so state_dict keys, checkpoints and EMA weights are those of the eager model.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.errors import UserError
from ldm.util import release_file_pages

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


AUTOCAST_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def store_for_autocast(module: nn.Module, dtype: torch.dtype) -> int:
    """Keep the weights and biases of `module`'s convolutions and linear layers in `dtype`, in place; the bytes freed.

    Autocast to `dtype` runs those layers on `dtype` copies of their fp32 parameters whatever they hold, cast at the
    first call and cached beside them (1.7 GB more for SD v1's UNet in bf16); storing the copies instead gives the
    same values (the same round-to-nearest cast), so the same outputs bit for bit, in half the parameter memory; the
    pages of a mapped checkpoint they were read from are given back (`ldm.util.release_file_pages`). For a module
    that from then on runs under that autocast only (a sampling script's UNet): outside it the layers see inputs of
    another dtype. Norm layers and embeddings keep their fp32 parameters, as autocast uses them."""
    params = [param for layer in module.modules() if isinstance(layer, AUTOCAST_LAYERS)
              for param in (layer.weight, layer.bias)
              if param is not None and param.is_floating_point() and param.dtype != dtype]
    size = torch.empty((), dtype=dtype).element_size()
    freed = sum(p.numel() * (p.element_size() - size) for p in params)

    def cast_one_by_one() -> Iterator[torch.Tensor]:
        for param in params:
            old, param.data = param.data, param.data.to(dtype)
            yield old  # released before the next is read: a mapped checkpoint's pages never all resident at once

    release_file_pages(cast_one_by_one())
    return freed


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


# parameters x UNet calls above which compiling pays for itself within one run on a CPU. Measured on the SD v1 UNet
# (860 M parameters), fp32, 2 quiet cores, inductor with freezing and a cold cache (docs/benchmarks.md,
# "Compiling"): a call gets 0.38-0.57 s faster at 32x32 and 64x64, batch 1 and 2 (1076 -> 698 ms at 32x32 batch 1,
# 5.87 -> 5.36 s at 64x64 batch 2, one guided step of a 512x512 image), after 56-72 s of compiling; so it pays after
# ~100-190 calls whatever the latent size: 860e6 * 150 ~ 1.3e11. End to end, a 512x512 txt2img run's first step took
# 61 s longer compiled and each later one 0.91 s less (pays from ~67 steps). A 50-step image stays eager; --n_iter 3
# and more compile. Freezing also keeps a prepacked second copy of the weights (peak memory 9.2 GiB against 4.1 eager at
# 64x64). The earlier estimate, that compiling halves a call at every size, had put this ~6x lower.
COMPILE_PAYS_AT = 150 * 860e6  # ~1.3e11


def compile_pays(model: Any, unet_calls: int) -> bool:
    """Whether compiling the UNet is likely to save more time than it costs over `unet_calls` forward passes (the
    `--compile` default of the sampling scripts)."""
    n_params = sum(p.numel() for p in unet_of(model).parameters())
    return n_params * unet_calls >= COMPILE_PAYS_AT


def accelerate(model: Any, compile: bool = False, channels_last: bool = False) -> Any:
    """Apply the switches to a model's UNet (channels_last first, then compile); returns the model."""
    if channels_last:
        to_channels_last(unet_of(model))
        logger.info("channels_last memory format for the UNet")
    if compile:
        compile_unet(model)
    return model
