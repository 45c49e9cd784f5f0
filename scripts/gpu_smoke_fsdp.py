"""GPU smoke test of sharded SD v1 training: the configs/stable-diffusion/train/v1-train-fsdp.yaml UNet (860M
parameters) trained with its FSDP strategy, bf16 and activation checkpointing on every visible GPU.

    python scripts/gpu_smoke_fsdp.py --steps 20 --batch-size 8          # CUDA: trains, saves, consolidates
    python scripts/gpu_smoke_fsdp.py --dry-run                          # CPU: builds and plans only

No weights or data are downloaded: the UNet and the autoencoder get random weights, and batches are synthetic
64x64x4 latents and 77x768 text contexts as a latent cache serves them (FirstStageLatent / CachedConditioning),
so the text encoder is not needed (an Identity stands in). It prints the step time, samples/s, peak GPU memory,
the sharded checkpoint's size, and checks that scripts/consolidate_checkpoint.py turns it into one file whose
weights and EMA are finite. --dry-run builds the model on the meta device, the strategy from the config, and prints
the FSDP units and the per-GPU memory the sharded states need.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

from ldm.modules.cached import CachedConditioning, FirstStageLatent  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

CONFIG = REPO / "configs" / "stable-diffusion" / "train" / "v1-train-fsdp.yaml"
BYTES_PER_TRAINED_PARAM = 4 + 4 + 8 + 4  # fp32 weight, gradient, Adam moments, EMA: all sharded


def get_parser() -> argparse.ArgumentParser:
    """Steps, batch, dry run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--config", default=str(CONFIG))
    add("--steps", type=int, default=20, help="optimisation steps (the first 3 are not timed)")
    add("--batch-size", dest="batch_size", type=int, default=8, help="per GPU")
    add("--dry-run", dest="dry_run", action="store_true", help="build on the meta device and plan, no training")
    return parser


class SyntheticLatents(IterableDataset):
    """Endless batches of random latents and text contexts, marked as cached (no encoders run)."""

    def __init__(self, batch_size: int, latent: Sequence[int] = (64, 64, 4), context: Sequence[int] = (77, 768)):
        self.batch_size, self.latent, self.context = batch_size, tuple(latent), tuple(context)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        generator = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
        while True:
            latent = torch.randn((self.batch_size, *self.latent), generator=generator)
            context = torch.randn((self.batch_size, *self.context), generator=generator)
            yield {"jpg": latent.as_subclass(FirstStageLatent), "txt": context.as_subclass(CachedConditioning)}


def smoke_config(path: str) -> Any:
    """The training config with random first-stage weights and an Identity in place of the text encoder."""
    config = OmegaConf.load(path)
    config.model.params.first_stage_config.params.ckpt_path = None
    config.model.params.cond_stage_config = {"target": "torch.nn.Identity"}
    config.model.params.ucg_training = {}  # cached contexts are not dropped to "" here
    return config


def plan(config: Any, gpus: int) -> dict[str, Any]:
    """Parameter counts, FSDP units and the per-GPU memory of the sharded training states."""
    from ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential

    strategy = instantiate_from_config(config.lightning.trainer.strategy, path="lightning.trainer.strategy")
    with torch.device("meta"):  # the parts: the diffusion schedule needs real numbers
        unet = instantiate_from_config(config.model.params.unet_config, path="model.params.unet_config")
        first = instantiate_from_config(config.model.params.first_stage_config,
                                        path="model.params.first_stage_config")
    trained = sum(p.numel() for p in unet.parameters())
    frozen = sum(p.numel() for p in first.parameters())
    units = sum(isinstance(m, TimestepEmbedSequential) for m in unet.modules()) + 1
    sharded_gb = trained * BYTES_PER_TRAINED_PARAM / max(1, gpus) / 2**30
    return {"strategy": type(strategy).__name__, "trained": trained, "frozen": frozen, "units": units, "gpus": gpus,
            "sharded_gb": sharded_gb, "replicated_gb": frozen * 4 / 2**30}


def train(config: Any, args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    """Train --steps steps on every GPU, save a sharded checkpoint; the timings (rank 0)."""
    import pytorch_lightning as pl

    from ldm.training.trainer import fault_tolerance_callbacks

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *_: Any) -> None:
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    timer = Timer()
    model = instantiate_from_config(config.model, path="model")
    model.learning_rate = 1e-5
    strategy = instantiate_from_config(config.lightning.trainer.strategy, path="lightning.trainer.strategy")
    trainer = pl.Trainer(accelerator="gpu", devices=torch.cuda.device_count(), strategy=strategy,
                         precision=config.lightning.trainer.precision, max_steps=args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=workdir,
                         callbacks=[timer, *fault_tolerance_callbacks(config.lightning)])
    trainer.fit(model, DataLoader(SyntheticLatents(args.batch_size), batch_size=None))
    checkpoint = os.path.join(workdir, "smoke.ckpt")
    trainer.save_checkpoint(checkpoint)
    steps = [b - a for a, b in zip(timer.times[3:], timer.times[4:])]
    return {"rank": trainer.global_rank, "step_s": sum(steps) / max(1, len(steps)), "checkpoint": checkpoint,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30, "world": trainer.world_size}


def main(argv: Sequence[str] | None = None) -> int:
    """Plan (and with CUDA, train, save and consolidate); print the figures."""
    args = get_parser().parse_args(argv)
    config = smoke_config(args.config)
    gpus = torch.cuda.device_count()
    figures = plan(config, max(1, gpus))
    print(f"{figures['strategy']}: {figures['units']} FSDP units, {figures['trained'] / 1e6:.1f}M trained and "
          f"{figures['frozen'] / 1e6:.1f}M frozen first-stage parameters; sharded weights+grads+Adam+EMA "
          f"{figures['sharded_gb']:.2f} GiB per GPU over {figures['gpus']}, first stage {figures['replicated_gb']:.2f}"
          " GiB on each")
    if args.dry_run:
        return 0
    if not gpus:
        print("no CUDA device: nothing trained (use --dry-run on CPU)")
        return 1
    workdir = tempfile.mkdtemp(prefix="gpu-smoke-fsdp-")
    result = train(config, args, workdir)
    if result["rank"] != 0:
        return 0
    size = sum(f.stat().st_size for f in Path(result["checkpoint"]).rglob("*") if f.is_file()) / 2**30
    print(f"{result['world']} GPU(s), batch {args.batch_size} each: {result['step_s'] * 1000:.0f} ms/step, "
          f"{args.batch_size * result['world'] / result['step_s']:.1f} samples/s, peak {result['peak_gb']:.1f} GiB "
          f"on rank 0; sharded checkpoint {size:.2f} GiB")
    out = os.path.join(workdir, "smoke-ema.safetensors")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "consolidate_checkpoint.py"), result["checkpoint"],
                           "--out", out, "--ema"], capture_output=True, text=True)
    print(done.stdout.strip() or done.stderr.strip())
    from safetensors.torch import load_file

    weights = load_file(out)
    finite = all(bool(torch.isfinite(v.float()).all()) for v in weights.values())
    print(f"consolidated: {len(weights)} tensors, all finite: {finite}")
    return 0 if done.returncode == 0 and finite else 1


if __name__ == "__main__":
    sys.exit(main())
