"""PSNR against training steps for the shapes autoencoder, to compare first-stage settings on CPU.

    python scripts/benchmark_autoencoder.py --steps 1500 --every 500
    python scripts/benchmark_autoencoder.py --steps 1000 model.params.lossconfig.params.pixel_loss=l1
    python scripts/benchmark_autoencoder.py --steps 500 "model.params.adam_betas=[0.5,0.9]"

Builds `configs/autoencoder/shapes-kl-f4.yaml` (plus dotlist overrides) and trains its generator side in a plain
loop: the model's own loss (optimizer_idx 0), its own first optimizer and EMA, batches from ShapesTrain. Every
`--every` steps it prints the PSNR of the raw and the EMA weights on held-out shapes and the share of their
reconstructions the shapes judge reads as the caption. No Lightning, so the numbers measure the settings, not the
trainer; the discriminator is not trained (the shapes config keeps it off).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ldm.data.shapes import ShapesTrain, ShapesValidation  # noqa: E402
from ldm.evaluation.shapes import autoencoder_scores  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

CONFIG = REPO / "configs/autoencoder/shapes-kl-f4.yaml"


def get_parser() -> argparse.ArgumentParser:
    """Steps, evaluation interval, threads and config overrides."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(CONFIG), help="autoencoder config")
    parser.add_argument("--steps", type=int, default=1000, help="training steps")
    parser.add_argument("--every", type=int, default=250, help="evaluate every this many steps")
    parser.add_argument("--eval-images", type=int, default=256, help="held-out shapes for PSNR and adherence")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist, e.g. model.params.lossconfig.params.pixel_loss=l1")
    return parser


def batches(dataset: ShapesTrain, batch_size: int):
    """Consecutive batches of images (B, 3, H, W) in [-1, 1]."""
    index = 0
    while True:
        images = [dataset[index + i]["image"] for i in range(batch_size)]
        index += batch_size
        yield torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()


def main(argv: Sequence[str] | None = None) -> int:
    """Train for --steps and print PSNR / adherence of the raw and EMA weights every --every steps."""
    args = get_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(args.overrides))
    model = instantiate_from_config(config.model, path="model")
    batch_size = int(config.data.params.batch_size)
    model.learning_rate = batch_size * float(config.model.base_learning_rate)
    opt_ae = model.configure_optimizers()[0]
    opt_ae = opt_ae[0] if isinstance(opt_ae, list) else opt_ae
    size = int(config.model.params.ddconfig.resolution)
    held_out = ShapesValidation(size=size, length=args.eval_images)
    print(f"lr {model.learning_rate:g}, batch {batch_size}, betas {opt_ae.defaults['betas']}, "
          f"pixel loss {config.model.params.lossconfig.params.get('pixel_loss', 'l1')}, EMA {model.use_ema}")
    start = time.monotonic()
    data = batches(ShapesTrain(size=size, length=10**9, seed=args.seed), batch_size)
    for step in range(1, args.steps + 1):
        model.train()
        x = next(data)
        reconstruction, posterior = model(x)
        loss, _ = model.loss(x, reconstruction, posterior, 0, global_step=step,
                             last_layer=model.get_last_layer(), split="train")
        opt_ae.zero_grad(set_to_none=True)
        loss.backward()
        opt_ae.step()
        if model.use_ema:
            model.model_ema(model)
        if step % args.every == 0 or step == args.steps:
            model.eval()
            raw_psnr, raw = autoencoder_scores(model, held_out, args.eval_images)
            line = f"step {step:5d}  {time.monotonic() - start:6.0f} s  raw {raw_psnr:5.2f} dB {100 * raw.overall:5.1f}%"
            if model.use_ema:
                with model.ema_scope():
                    ema_psnr, ema = autoencoder_scores(model, held_out, args.eval_images)
                line += f"  EMA {ema_psnr:5.2f} dB {100 * ema.overall:5.1f}%"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
