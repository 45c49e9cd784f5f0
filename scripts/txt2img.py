"""Text-to-image sampling with the Stable Diffusion command line.

    python scripts/txt2img.py --prompt "a red circle on a white background" --plms --ckpt sd-v1.ckpt
    python scripts/txt2img.py -r logs/<run> --prompt "..." --H 16 --W 16 --ddim_steps 50   # a main.py run

Writes <outdir>/samples/NNNNN.png (numbered after the files already there) and <outdir>/grid-NNNN.png, each with
PNG text metadata (prompt, seed, sampler, schedule, steps, scale, eta, guidance_rescale, checkpoint; those not set
are left out). Sample k of iteration n uses the seed `--seed + n * n_samples + k` (with --fixed_code: `--seed + k`,
the same start codes every iteration): its metadata seed regenerates it alone, whatever the batch.
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
from ldm.pipelines import Txt2Img  # noqa: E402

DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"


def get_parser() -> argparse.ArgumentParser:
    """The flags of the original txt2img.py (plus -r/--resume, --sampler and its options, --device, --ema)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    inf.add_prompt_flags(parser, outdir="outputs/txt2img-samples")
    inf.add_sampler_flags(parser)
    add = parser.add_argument
    add("--H", type=int, default=512, help="image height in pixels")
    add("--W", type=int, default=512, help="image width in pixels")
    inf.add_sampling_flags(parser, n_iter=3, n_samples=3, scale=7.5)
    inf.add_model_flags(parser, DEFAULT_CONFIG, DEFAULT_CKPT)
    return parser


def generate(args: argparse.Namespace) -> list[str]:
    """Sample every prompt n_iter times; returns the written paths."""
    name = inf.sampler_name(args)
    inf.check_counts(args)
    prompts = inf.read_prompt_flags(args)
    model, _, ckpt = inf.load_from_args(args)
    inf.check_latent_flags(args, model)
    job = Txt2Img(model, ckpt, sampler=name, steps=args.steps, scale=args.scale, eta=inf.sampler_eta(args, name),
                  spacing=args.spacing, guidance_rescale=args.guidance_rescale, height=args.H, width=args.W,
                  precision=args.precision)
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
