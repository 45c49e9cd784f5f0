"""Time our UNetModel against diffusers' UNet2DConditionModel with the same (converted) SD v1 weights.

Both models run one forward pass per measurement under `torch.inference_mode()`, after a warm-up pass;
the table reports median milliseconds and the ratio ours / diffusers (below 1 means ours is faster).
diffusers runs with its default `AttnProcessor2_0` (PyTorch SDPA), its fastest processor without xformers.

Example:
    python scripts/benchmark_unet.py --threads 2 --sizes 32 64 --batches 1 2 --dtypes fp32 bf16 --out docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ldm.convert.diffusers_unet import diffusers_unet_config, unet_state_dict_to_diffusers
from ldm.modules.attention import set_fused_projections
from ldm.modules.diffusionmodules.openaimodel import UNetModel

# The UNet of configs/stable-diffusion/v1-inference.yaml.
SD_V1_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
    num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
    transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False,
)
CONTEXT_LENGTH = 77
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent side lengths")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="batch sizes")
    parser.add_argument(
        "--dtypes", nargs="+", choices=["fp32", "fp16", "bf16"], default=None,
        help="fp32 and/or autocast dtypes (default: fp32 bf16 on CPU, fp32 fp16 bf16 on CUDA)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per point (after one warm-up pass)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--compile", action="store_true",
                        help="compile both models (torch.compile, inductor with freezing): compiled vs compiled; the "
                             "first call's time (compiling included) is printed per model")
    parser.add_argument("--ablate-fusions", action="store_true",
                        help="also time ours with the fused q/k/v projections (ldm.modules.attention; off by default)")
    parser.add_argument("--out", type=Path, default=None, help="append the Markdown table to this file")
    return parser.parse_args(argv)


def build_models(device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our SD v1 UNet (random init) and diffusers' twin sharing the very same weight tensors."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(0)
    ours = UNetModel(**SD_V1_UNET).to(device).eval()
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**diffusers_unet_config(SD_V1_UNET))
    # assign=True: the diffusers model takes our tensors instead of a second 3.4 GB copy
    theirs.load_state_dict(unet_state_dict_to_diffusers(ours.state_dict(), SD_V1_UNET), strict=True, assign=True)
    theirs.eval()
    theirs.set_attn_processor(AttnProcessor2_0())
    return ours, theirs


def _sync(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock times are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fns: list[Callable[[], object]], repeats: int, device: torch.device) -> list[float]:
    """Median wall-clock milliseconds of each function, after one warm-up run each.

    The timed runs alternate between the functions, so a noisy (shared) machine slows them alike.
    """
    for fn in fns:
        fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, slot in zip(fns, times):
            start = time.perf_counter()
            fn()
            _sync(device)
            slot.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def run_point(
    ours: torch.nn.Module, theirs: torch.nn.Module, device: torch.device, dtype: str, batch: int, size: int,
    repeats: int, ablate: bool = False,
) -> tuple[float, ...]:
    """(ours ms, diffusers ms[, ours with fused q/k/v ms]) at one grid point."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, size, size, generator=gen).to(device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    ctx = torch.randn(batch, CONTEXT_LENGTH, SD_V1_UNET["context_dim"], generator=gen).to(device)

    def autocast() -> contextlib.AbstractContextManager:
        if dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[dtype])

    def run_ours() -> object:
        with torch.inference_mode(), autocast():
            return ours(x, t, context=ctx)

    def run_theirs() -> object:
        with torch.inference_mode(), autocast():
            return theirs(x, t, encoder_hidden_states=ctx).sample

    def run_fused() -> object:
        set_fused_projections(ours, True)
        try:
            return run_ours()
        finally:
            set_fused_projections(ours, False)

    fns = [run_ours, run_theirs] + ([run_fused] if ablate else [])
    for name, fn in zip(("ours", "diffusers"), fns):
        start = time.perf_counter()
        fn()
        _sync(device)
        print(f"  first call {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return tuple(median_ms(fns, repeats, device))


def main(argv: list[str] | None = None) -> None:
    """Run the grid and print (and optionally append) the Markdown table."""
    import diffusers

    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtypes = args.dtypes or (["fp32", "fp16", "bf16"] if device.type == "cuda" else ["fp32", "bf16"])
    ours, theirs = build_models(device)
    if args.compile:
        import torch._inductor.config as inductor_config

        from ldm.acceleration import enable_compile_cache

        enable_compile_cache()
        inductor_config.freezing = True
        ours, theirs = torch.compile(ours), torch.compile(theirs)
    processors = sorted({type(p).__name__ for p in theirs.attn_processors.values()})
    what = (
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, python {platform.python_version()}, "
        f"{torch.get_num_threads()} threads, device {device}, {args.repeats} timed repeats after 1 warm-up "
        f"(median, ours and diffusers alternating), diffusers attention processor: {', '.join(processors)}"
    )
    print(what, flush=True)
    lines = [
        "| device | dtype | batch | latent | ours ms | diffusers ms | ratio |"
        + (" ours fused q/k/v ms |" if args.ablate_fusions else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if args.ablate_fusions else ""),
    ]
    print("\n".join(lines), flush=True)
    for dtype in dtypes:
        for batch in args.batches:
            for size in args.sizes:
                ms = run_point(ours, theirs, device, dtype, batch, size, args.repeats, args.ablate_fusions)
                kind = ("compiled " if args.compile else "") + (dtype if dtype == "fp32" else dtype + " autocast")
                row = (
                    f"| {device.type} | {kind} | {batch} | {size}x{size} "
                    f"| {ms[0]:.0f} | {ms[1]:.0f} | {ms[0] / ms[1]:.2f} |" + "".join(f" {m:.0f} |" for m in ms[2:])
                )
                print(row, flush=True)
                lines.append(row)
    if args.out is not None:
        with args.out.open("a") as f:
            command = " ".join(["python", "scripts/benchmark_unet.py", *(sys.argv[1:] if argv is None else argv)])
            f.write(f"\n`{command}`\n\n{what}\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
