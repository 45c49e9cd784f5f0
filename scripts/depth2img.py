"""Depth-to-image (SD 2's depth2img): keep the depth of an image, redraw the rest from a prompt, with DDIM.

    python scripts/depth2img.py --init-img room.png --prompt "a cozy wooden cabin" --strength 0.8 \\
        --config configs/stable-diffusion/v2-midas-inference.yaml --ckpt 512-depth-ema.ckpt
    python scripts/depth2img.py -r logs/<shapes-depth2img run> --init-img scene.png --depth-img depth.png \\
        --prompt "a red circle on a white background" --strength 1.0 --n_samples 4

The model (LatentDepth2ImageDiffusion) reads the depth as a concatenated channel: estimated by its MiDaS depth stage
from --init-img, or read from --depth-img (a grayscale image, brighter = nearer, any size), normalised to [-1, 1] at
the latent size. --strength s renoises the init image's latent over the last s * steps DDIM steps (1: from the depth
and the prompt alone); guidance (--scale) keeps the depth on both sides. Writes <outdir>/samples/NNNNN.png (prompt,
seed, strength, depth source, ... as PNG metadata), <outdir>/grid-NNNN.png and <outdir>/depth.png (the depth read).
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

from ldm import inference as inf  # noqa: E402
from ldm.pipelines import Depth2Img  # noqa: E402

DEFAULT_CONFIG = "configs/stable-diffusion/v2-midas-inference.yaml"
DEFAULT_CKPT = "checkpoints/512-depth-ema.ckpt"


def get_parser() -> argparse.ArgumentParser:
    """SD 2's depth2img settings as flags (as img2img.py's), plus --depth-img."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    inf.add_prompt_flags(parser, outdir="outputs/depth2img-samples")
    add = parser.add_argument
    add("--init-img", dest="init_img", type=str, required=True, help="path to the input image")
    add("--depth-img", dest="depth_img", type=str, default=None,
        help="a depth image to use instead of MiDaS' estimate (grayscale, brighter = nearer)")
    add("--strength", type=float, default=0.8, help="how much of the image to renoise, in [0, 1]")
    inf.add_sampling_flags(parser, n_iter=1, n_samples=3, scale=9.0)
    inf.add_model_flags(parser, DEFAULT_CONFIG, DEFAULT_CKPT)
    return parser


def generate(args: argparse.Namespace) -> list[str]:
    """Redraw the init image for every prompt n_iter times; returns the written paths."""
    inf.check_counts(args)
    prompts = inf.read_prompt_flags(args)
    model, _, ckpt = inf.load_from_args(args)
    inf.check_latent_flags(args, model)
    image = inf.read_image(args.init_img, "--init-img")
    depth = inf.read_image(args.depth_img, "--depth-img", mode="L") if args.depth_img else None
    job = Depth2Img(model, ckpt, steps=args.steps, scale=args.scale, eta=args.ddim_eta, image=image,
                    image_path=args.init_img, strength=args.strength, depth_image=depth, depth_path=args.depth_img,
                    precision=args.precision)
    if job.cropped_from:
        print(f"cropping {args.init_img} from {job.cropped_from[0]}x{job.cropped_from[1]} to {job.size[0]}x{job.size[1]}")
    inf.seed_everything(args.seed)
    written = inf.sample_prompts(args, prompts, job)
    depth_path = os.path.join(args.outdir, "depth.png")
    inf.save_png(inf.to_uint8(job.depth_preview())[0], depth_path, {"depth": job.common.get("depth_image") or
                                                                    job.common.get("depth")})
    print(f"Your samples are ready and waiting for you here:\n{args.outdir}\nEnjoy.")
    return [*written, depth_path]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and sample; user mistakes print one line and return 2."""
    return inf.run_cli(get_parser(), generate, argv)


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
