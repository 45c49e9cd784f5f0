"""Training steps per second of the shapes LDM from image shards against from a latent cache of the same images.

    python scripts/benchmark_latent_cache.py --samples 2048 --steps 10 --rounds 20

Writes --samples shapes (16x16 PNGs and their captions, `ShapesTrain`) as tar shards, encodes them once with the
shapes LDM's first stage into a latent cache (`ldm.data.latent_cache`, bf16 moments; its wall time is printed), then
alternates blocks of --steps optimisation steps of `configs/latent-diffusion/shapes-ldm-kl-4.yaml` (loss, backward,
AdamW step; batch 32; no Lightning), --rounds blocks each, reading batches from the image shards (decode; the loss
encodes and samples z) and from the cache (read moments, sample z; the loss skips the encoder), with the same loader
(ShardLoader, 0 workers: reading counts in the time). Prints, per source, the median steps/s over its blocks and the
median time per step spent reading and training, and the median speed ratio of paired blocks. The weights are
random: speed does not depend on them.
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402

from ldm.data.laion import WebDataModuleFromConfig  # noqa: E402
from ldm.data.latent_cache import LatentCacheDataModule, build_cache  # noqa: E402
from ldm.data.shapes import ShapesTrain  # noqa: E402
from ldm.data.shard_writer import write_shards  # noqa: E402
from ldm.util import DTYPE_NAMES, instantiate_from_config  # noqa: E402

CONFIG = REPO / "configs/latent-diffusion/shapes-ldm-kl-4.yaml"


def get_parser() -> argparse.ArgumentParser:
    """Dataset size, steps, rounds, threads."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--samples", type=int, default=2048, help="shapes written as shards")
    add("--steps", type=int, default=10, help="optimisation steps per timed block")
    add("--warmup", type=int, default=5, help="untimed steps from each source first")
    add("--rounds", type=int, default=20, help="alternating blocks per source (images, cache, images, ...)")
    add("--threads", type=int, default=1, help="torch threads (more than the free cores slows every step)")
    add("--dtype", choices=sorted(DTYPE_NAMES), default="bf16", help="dtype of the cached moments")
    return parser


def shape_samples(count: int) -> Iterator[dict]:
    """ShapesTrain examples as shard samples (PNG bytes, caption)."""
    dataset = ShapesTrain(size=16, length=count)
    for index in range(count):
        example = dataset[index]
        pixels = ((example["image"] + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        yield {"__key__": f"{index:09d}", "png": buffer.getvalue(), "txt": example["caption"], "json": {}}


def make_cache(model: torch.nn.Module, shards: Path, out: Path, dtype: str) -> float:
    """Encode the image shards into a latent cache at `out`; the seconds it took."""
    images = WebDataModuleFromConfig(tar_base=str(shards), batch_size=64, num_workers=0,
                                     train={"shards": sorted(p.name for p in shards.glob("*.tar")), "repeat": False,
                                            "rename": {"jpg": "image", "txt": "caption"}})
    start = time.monotonic()
    build_cache(model, images.make_loader("train"), str(out), dtype)
    return time.monotonic() - start


def timed_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: Iterator[dict],
                steps: int) -> tuple[float, float]:
    """(seconds reading batches, seconds in loss + backward + optimizer step) over `steps` steps."""
    model.train()
    reading = training = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        batch = next(loader)
        middle = time.perf_counter()
        loss, _ = model.shared_step(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        reading, training = reading + middle - start, training + time.perf_counter() - middle
    return reading, training


def main(argv: Sequence[str] | None = None) -> int:
    """Build the data, cache it, time both sources in alternation and print the figures."""
    args = get_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = OmegaConf.load(CONFIG)
    model = instantiate_from_config(config.model, path="model")
    model.scale_factor.fill_(1.0)  # scale_by_std's value plays no part in the speed
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    batch = int(config.data.params.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        shards, cache = Path(tmp) / "shards", Path(tmp) / "cache"
        write_shards(shape_samples(args.samples), shards, 1000)
        seconds = make_cache(model, shards, cache, args.dtype)
        print(f"cached {args.samples} shapes in {seconds:.1f} s ({args.samples / seconds:.0f} images/s, {args.dtype})")
        images = iter(WebDataModuleFromConfig(
            tar_base=str(shards), batch_size=batch, num_workers=0, train={
                "shards": sorted(p.name for p in shards.glob("*.tar")), "shuffle": 256,
                "rename": {"jpg": "image", "txt": "caption"}}).make_loader("train"))
        latents = iter(LatentCacheDataModule(batch_size=batch, num_workers=0,
                                             train={"cache": str(cache), "shuffle": 256}).make_loader("train"))
        for loader in (images, latents):
            timed_steps(model, optimizer, loader, args.warmup)
        blocks: dict[str, list[tuple[float, float]]] = {"images": [], "cache": []}
        for _ in range(args.rounds):  # short alternating blocks: the machine's load changes both alike
            for name, loader in (("images", images), ("cache", latents)):
                blocks[name].append(timed_steps(model, optimizer, loader, args.steps))
    for name, values in blocks.items():
        rate = statistics.median(args.steps / (r + t) for r, t in values)
        read = statistics.median(r / args.steps for r, _ in values) * 1000
        step = statistics.median(t / args.steps for _, t in values) * 1000
        note = "the loss runs the encoder" if name == "images" else "the encoder is skipped"
        print(f"{name:6s}: {rate:5.2f} steps/s (median of {args.rounds} blocks of {args.steps}); per step "
              f"{read:5.1f} ms reading + {step:6.1f} ms loss/backward/step ({note})")
    ratio = statistics.median((ri + ti) / (rc + tc) for (ri, ti), (rc, tc) in zip(blocks["images"], blocks["cache"]))
    print(f"cache / images speed, median over the paired blocks: {ratio:.2f}x (batch {batch}, {args.threads} thread)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
