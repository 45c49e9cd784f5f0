"""GPU readiness in one command: SD v1 UNet CFG steps, VAE decode and a training step, with it/s, img/s and MFU.

Workloads (shapes of Stable Diffusion v1, random weights from configs/stable-diffusion/v1-inference.yaml):
- `unet-cfg`: one classifier-free-guidance step at 512x512 (64x64 latents, the conditional and unconditional halves
  in one batch of 2B) for B in --batches, bf16 autocast, attention through SDPA; eager, `torch.compile` (inductor)
  and `torch.compile(mode="reduce-overhead")` (inductor with CUDA graphs);
- `vae-decode`: the autoencoder's decoder from 64x64x4 latents to 512x512 images;
- `train-256`: one training step at 256x256 (32x32 latents) in bf16-mixed: the frozen first stage encodes the images
  without gradients, UNet forward and backward under bf16 autocast with fp32 weights, fused AdamW step.

FLOPs of one iteration are counted once per workload with `torch.utils.flop_counter.FlopCounterMode` (matrix
products and convolutions, backward included for training); MFU = FLOPs / time / peak, with the peak dense bf16
throughput of the device from `PEAK_TFLOPS` (or `--peak-tflops`). `--dry-run` runs every workload and variant at
tiny shapes on the CPU (CUDA graphs do not exist there: that variant is inductor's reduce-overhead mode without
them), so CI checks that the script works without a GPU.

    python scripts/benchmark_gpu.py                    # on a CUDA machine: a few minutes
    python scripts/benchmark_gpu.py --dry-run          # tiny shapes on CPU
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from ldm.acceleration import enable_compile_cache  # noqa: E402
from ldm.util import fused_adam_kwargs, instantiate_from_config  # noqa: E402

SD_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"
# dense bf16 tensor-core peak, TFLOP/s (vendor data sheets, without sparsity)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "A10G": 70.0, "L40S": 362.0,
               "L4": 121.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0}
VARIANTS = {"eager": None, "compile": "default", "compile+cudagraphs": "reduce-overhead"}
TINY_UNET = {"model_channels": 32, "channel_mult": [1, 2], "attention_resolutions": [1, 2], "num_res_blocks": 1,
             "num_heads": 4, "context_dim": 32}
TINY_VAE = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "resolution": 32, "attn_resolutions": []}


@dataclass
class Shapes:
    """What the workloads run at: image side, CFG batches, training batch, context length and width."""

    image: int
    train_image: int
    batches: list[int]
    train_batch: int
    context: tuple[int, int]
    factor: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--dry-run", action="store_true", help="tiny shapes on CPU (checks the script, measures nothing useful)")
    add("--batches", type=int, nargs="+", default=[1, 8], help="images per CFG step")
    add("--train-batch", type=int, default=16, help="images per training step at 256x256")
    add("--iters", type=int, default=20, help="timed iterations per measurement (after the warm-up)")
    add("--warmup", type=int, default=3, help="untimed iterations first (the first one compiles)")
    add("--workloads", nargs="+", default=["unet-cfg", "vae-decode", "train-256"],
        choices=["unet-cfg", "vae-decode", "train-256"])
    add("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    add("--peak-tflops", type=float, default=None, help="the device's peak bf16 TFLOP/s (default: from its name)")
    return parser.parse_args(argv)


def device_peak(device: torch.device, override: float | None) -> tuple[str, float | None]:
    """(device name, peak bf16 FLOP/s or None when unknown)."""
    if device.type != "cuda":
        return "cpu", override * 1e12 if override else None
    name = torch.cuda.get_device_name(device)
    if override:
        return name, override * 1e12
    match = next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)
    return name, match * 1e12 if match else None


def sd_parts(dry_run: bool) -> tuple[Any, Any, Shapes]:
    """The SD v1 UNet config params and first-stage config (tiny ones for a dry run) and the shapes."""
    model = OmegaConf.load(SD_CONFIG).model.params
    unet, first = model.unet_config.params, model.first_stage_config
    first.params.lossconfig = {"target": "torch.nn.Identity"}
    if dry_run:
        unet = OmegaConf.merge(unet, TINY_UNET)
        first.params.ddconfig = OmegaConf.merge(first.params.ddconfig, TINY_VAE)
        return unet, first, Shapes(32, 16, [1, 2], 2, (5, 32), 2)
    factor = 2 ** (len(first.params.ddconfig.ch_mult) - 1)
    return unet, first, Shapes(512, 256, [], 0, (77, int(unet.context_dim)), factor)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` (FlopCounterMode: matmuls, convolutions, attention; backward when it runs)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def timed(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int) -> tuple[float, float]:
    """(seconds of the first call — compile included —, median seconds of the timed calls)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def variant(module: torch.nn.Module, name: str) -> Callable[..., Any]:
    """The module run eagerly or through torch.compile in the variant's mode (a fresh compilation each time)."""
    mode = VARIANTS[name]
    if mode is None:
        return module
    torch._dynamo.reset()
    enable_compile_cache()
    return torch.compile(module, mode=mode)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on the device."""
    return torch.autocast(device.type, dtype=torch.bfloat16)


def unet_cfg_workload(unet: torch.nn.Module, shapes: Shapes, batch: int, device: torch.device
                      ) -> Callable[[Callable[..., Any]], Callable[[], Any]]:
    """A CFG step for `batch` images: one UNet call on 2*batch latents, then the guidance combination."""
    side = shapes.image // shapes.factor
    x = torch.randn(2 * batch, 4, side, side, device=device)
    t = torch.full((2 * batch,), 500, device=device, dtype=torch.long)
    ctx = torch.randn(2 * batch, *shapes.context, device=device)

    def make(run: Callable[..., Any]) -> Callable[[], Any]:
        def step() -> Any:
            with torch.inference_mode(), autocast(device):
                cond, uncond = run(x, t, context=ctx).chunk(2)
                return uncond + 7.5 * (cond - uncond)
        return step
    return make


def vae_workload(decoder: torch.nn.Module, shapes: Shapes, device: torch.device
                 ) -> Callable[[Callable[..., Any]], Callable[[], Any]]:
    """One 512x512 decode (the first stage's post_quant_conv + decoder)."""
    side = shapes.image // shapes.factor
    z = torch.randn(1, 4, side, side, device=device)

    def make(run: Callable[..., Any]) -> Callable[[], Any]:
        def step() -> Any:
            with torch.inference_mode(), autocast(device):
                return run(z)
        return step
    return make


def train_workload(unet: torch.nn.Module, first_stage: Any, shapes: Shapes, device: torch.device
                   ) -> Callable[[Callable[..., Any]], Callable[[], Any]]:
    """One bf16-mixed training step at the training size: encode (no grad), UNet forward + backward, AdamW."""
    side = shapes.train_image
    images = torch.rand(shapes.train_batch, 3, side, side, device=device) * 2 - 1
    ctx = torch.randn(shapes.train_batch, *shapes.context, device=device)
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5, **fused_adam_kwargs(params))

    def make(run: Callable[..., Any]) -> Callable[[], Any]:
        def step() -> Any:
            with torch.no_grad(), autocast(device):
                z = first_stage.encode(images).sample() * 0.18215
            noise = torch.randn_like(z.float())
            t = torch.randint(0, 1000, (z.shape[0],), device=device)
            with autocast(device):
                loss = torch.nn.functional.mse_loss(run(z.float() + noise, t, context=ctx).float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss
        return step
    return make


def report(rows: list[dict[str, Any]], peak: float | None) -> str:
    """The Markdown table of the measured rows."""
    lines = ["| workload | variant | batch | first call s | it/s | img/s | TFLOP/s | MFU |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tflops = r["flops"] / r["seconds"] / 1e12
        mfu = f"{100 * r['flops'] / r['seconds'] / peak:.1f}%" if peak else "-"
        lines.append(f"| {r['workload']} | {r['variant']} | {r['batch']} | {r['first']:.2f} | {1 / r['seconds']:.2f} "
                     f"| {r['batch'] / r['seconds']:.2f} | {tflops:.3f} | {mfu} |")
    return "\n".join(lines)


def workloads(args: argparse.Namespace, device: torch.device) -> list[tuple[str, int, torch.nn.Module, Any]]:
    """(name, images per iteration, module to compile, workload maker) for every requested workload."""
    unet_params, first_config, shapes = sd_parts(args.dry_run)
    if not args.dry_run:
        shapes.batches, shapes.train_batch = args.batches, args.train_batch
    torch.manual_seed(0)
    unet = instantiate_from_config({"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                    "params": unet_params}).to(device)
    first_stage = instantiate_from_config(first_config).to(device).eval().requires_grad_(False)
    out: list[tuple[str, int, torch.nn.Module, Any]] = []
    if "unet-cfg" in args.workloads:
        out += [("unet-cfg", b, unet, unet_cfg_workload(unet.eval(), shapes, b, device)) for b in shapes.batches]
    if "vae-decode" in args.workloads:
        decode = torch.nn.Sequential(first_stage.post_quant_conv, first_stage.decoder)
        out.append(("vae-decode", 1, decode, vae_workload(decode, shapes, device)))
    if "train-256" in args.workloads:
        out.append(("train-256", shapes.train_batch, unet, train_workload(unet, first_stage, shapes, device)))
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run every workload in every variant; print the table; returns its rows."""
    args = parse_args(argv)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.dry_run:
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --dry-run for the tiny CPU check")
    if args.dry_run:
        args.iters, args.warmup = min(args.iters, 2), min(args.warmup, 2)
    name, peak = device_peak(device, args.peak_tflops)
    print(f"device {name}; peak {peak / 1e12 if peak else '?'} TFLOP/s bf16; torch {torch.__version__}", flush=True)
    rows = []
    for workload, batch, module, make in workloads(args, device):
        training = workload.startswith("train")
        module.train(training)
        flops = count_flops(make(module))
        for v in args.variants:
            first, seconds = timed(make(variant(module, v)), device, args.iters, args.warmup)
            rows.append(dict(workload=workload, variant=v, batch=batch, first=first, seconds=seconds, flops=flops))
            print(report(rows[-1:], peak).splitlines()[-1], flush=True)
    print(report(rows, peak))
    return rows


if __name__ == "__main__":
    main()
