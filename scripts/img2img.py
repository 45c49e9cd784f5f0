"""Image-to-image (SDEdit, Meng et al. 2022): noise an image's latent part of the way, then denoise it with DDIM.

    python scripts/img2img.py --init-img sketch.png --prompt "a fantasy landscape" --strength 0.75 --ckpt sd-v1.ckpt
    python scripts/img2img.py -r logs/<run> --init-img shape.png --prompt "a red circle on a white background"

--strength s in [0, 1] runs the last s * steps DDIM steps: 0 returns the image through the autoencoder, 1 starts
from (almost) pure noise. The image is encoded to its latent posterior's mode, cropped down to a multiple of the
model's downsampling factor; outputs and metadata as txt2img.py (plus strength and the init image's name).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ldm import inference as inf  # noqa: E402
from ldm.pipelines import Img2Img  # noqa: E402

DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"


def get_parser() -> argparse.ArgumentParser:
    """The flags of the original img2img.py (plus -r/--resume, --device, --ema)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    inf.add_prompt_flags(parser, outdir="outputs/img2img-samples")
    add = parser.add_argument
    add("--init-img", dest="init_img", type=str, required=True, help="path to the input image")
    add("--strength", type=float, default=0.75, help="how much of the image to renoise, in [0, 1]")
    inf.add_sampling_flags(parser, n_iter=1, n_samples=2, scale=5.0)
    inf.add_model_flags(parser, DEFAULT_CONFIG, DEFAULT_CKPT)
    return parser


def generate(args: argparse.Namespace) -> list[str]:
    """Edit the init image for every prompt n_iter times; returns the written paths."""
    inf.check_counts(args)
    prompts = inf.read_prompts(args.from_file) if args.from_file else [args.prompt or ""]
    model, _, ckpt = inf.load_from_args(args)
    inf.check_latent_flags(args, model)
    image = inf.read_image(args.init_img, "--init-img")
    job = Img2Img(model, ckpt, steps=args.steps, scale=args.scale, eta=args.ddim_eta, image=image,
                  image_path=args.init_img, strength=args.strength, precision=args.precision)
    if job.cropped_from:
        print(f"cropping {args.init_img} from {job.cropped_from[0]}x{job.cropped_from[1]} to {job.size[0]}x{job.size[1]}")
    inf.seed_everything(args.seed)
    written = inf.sample_prompts(args, prompts, job)
    print(f"Your samples are ready and waiting for you here:\n{args.outdir}\nEnjoy.")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and sample; user mistakes print one line and return 2."""
    return inf.run_cli(get_parser(), generate, argv)


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
