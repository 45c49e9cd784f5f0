"""Super-resolution: upscale images with a latent super-resolution checkpoint.

    python scripts/superres.py --image low.png --prompt "a photo of a cat" --noise_level 20   # SD x4 upscaler
    python scripts/superres.py --image low.png --config configs/bsr_sr.yaml --ckpt bsr_sr.ckpt --steps 100
    python scripts/superres.py --image low.png -r logs/<sr run>

Two kinds of checkpoints work:
- the Stable Diffusion x4 upscaler (`LatentUpscaleDiffusion`): the low-resolution image, noise-augmented to
  --noise_level by the model's low-scale model, is concatenated to the latent and its level passed as the UNet's
  class label; the prompt guides it (classifier-free guidance with --scale);
- latent-diffusion's SR models (`LatentDiffusion` with conditioning_key concat, e.g. bsr_sr): the conditioner
  (identity or SpatialRescaler) maps the image to the latent's size, which is concatenated to the latent.
The output is the latent's size times the first stage's factor. Results: <outdir>/<name>.png with PNG metadata.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tqdm import tqdm  # noqa: E402

from ldm import inference as inf  # noqa: E402
from ldm.pipelines import SuperRes  # noqa: E402

DEFAULT_CONFIG = "configs/stable-diffusion/x4-upscaling.yaml"
DEFAULT_CKPT = "models/ldm/x4-upscaler/x4-upscaler-ema.ckpt"


def get_parser() -> argparse.ArgumentParser:
    """Input images, output folder, sampling and model flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--image", nargs="+", required=True, help="low-resolution image(s)")
    add("--outdir", default="outputs/superres-samples", help="where to write <name>.png")
    add("--steps", "--ddim_steps", dest="steps", type=int, default=50, help="DDIM steps")
    add("--ddim_eta", type=float, default=0.0, help="eta of DDIM (0: deterministic)")
    add("--prompt", default="", help="text guiding the x4 upscaler")
    add("--scale", type=float, default=9.0, help="classifier-free guidance scale for the x4 upscaler (1: none)")
    add("--noise_level", type=int, default=20, help="noise augmentation of the input for the x4 upscaler")
    add("--seed", type=int, default=42, help="seed of the first image (image i uses seed + i)")
    inf.add_model_flags(parser, DEFAULT_CONFIG, DEFAULT_CKPT)
    return parser


def generate(args: argparse.Namespace) -> list[str]:
    """Upscale every image; returns the written paths."""
    inf.check_counts(args)
    model, _, ckpt = inf.load_from_args(args)
    task = SuperRes(model, ckpt, steps=args.steps, scale=args.scale, eta=args.ddim_eta, prompt=args.prompt,
                    noise_level=args.noise_level, precision=args.precision)
    lows = [(path, inf.read_image(path, "--image")) for path in args.image]
    prepared = [task.prepare(low, path, args.seed + i) for i, (path, low) in enumerate(lows)]  # all checked first
    written = []
    for item in tqdm(prepared, desc="Upscaling"):
        samples = task(item)
        out = os.path.join(args.outdir, Path(item.path).stem + ".png")
        inf.save_png(inf.to_uint8(samples.images)[0], out, samples.metadata[0])
        written.append(out)
    print(f"Upscaled {len(written)} image(s) into {args.outdir}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and upscale; user mistakes print one line and return 2."""
    return inf.run_cli(get_parser(), generate, argv)


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
