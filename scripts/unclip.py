"""Image variations with SD 2.1 unCLIP (stable unCLIP): new images from an image's CLIP embedding and a prompt.

    python scripts/unclip.py --init-img photo.png --prompt "a professional photograph" --noise_level 0 \\
        --config configs/stable-diffusion/v2-1-stable-unclip-h-inference.yaml --ckpt sd21-unclip-h.ckpt
    python scripts/unclip.py -r logs/<shapes-unclip run> --init-img shape.png --n_samples 4 --H 16 --W 16

The model (ImageEmbeddingConditionedLatentDiffusion) reads the image's CLIP embedding, noise-augmented to
--noise_level (0: as it is; higher: looser variations) with per-sample seeded noise, as its vector input, and the
prompt (may be empty) by cross-attention. Guidance (--scale) is against the negative prompt (or the empty caption)
with a zero image embedding, as SD 2's stable unCLIP script. Each --init-img gets its own samples and grid:
<outdir>/samples/NNNNN.png (init image, noise level, prompt, seed, ... as PNG metadata) and <outdir>/grid-NNNN.png.
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
from ldm.pipelines import ImageVariations  # noqa: E402

DEFAULT_CONFIG = "configs/stable-diffusion/v2-1-stable-unclip-h-inference.yaml"
DEFAULT_CKPT = "checkpoints/sd21-unclip-h.ckpt"


def get_parser() -> argparse.ArgumentParser:
    """Init image(s), noise level, prompt and negative prompt, the sampling and model flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    inf.add_prompt_flags(parser, outdir="outputs/unclip-samples")
    parser.set_defaults(prompt="")
    add = parser.add_argument
    add("--init-img", dest="init_img", nargs="+", required=True, help="the image(s) to vary")
    add("--noise_level", type=int, default=0, help="noise augmentation of the CLIP image embedding")
    add("--negative_prompt", default="", help="the unconditional side of the guidance (default: the empty caption)")
    inf.add_sampler_flags(parser)
    add("--H", type=int, default=None, help="image height in pixels (default: the model's)")
    add("--W", type=int, default=None, help="image width in pixels (default: the model's)")
    inf.add_sampling_flags(parser, n_iter=1, n_samples=4, scale=10.0)
    inf.add_model_flags(parser, DEFAULT_CONFIG, DEFAULT_CKPT)
    return parser


def generate(args: argparse.Namespace) -> list[str]:
    """Vary every init image for every prompt n_iter times; returns the written paths."""
    inf.check_counts(args)
    prompts = inf.read_prompts(args.from_file) if args.from_file else [args.prompt or ""]
    model, _, ckpt = inf.load_from_args(args)
    inf.check_latent_flags(args, model)
    images = [(path, inf.read_image(path, "--init-img")) for path in args.init_img]
    name = inf.sampler_name(args)
    jobs = [ImageVariations(model, ckpt, steps=args.steps, scale=args.scale, eta=inf.sampler_eta(args, name),
                            sampler=name, spacing=args.spacing, guidance_rescale=args.guidance_rescale,
                            negative_prompt=args.negative_prompt, precision=args.precision, image=image,
                            image_path=path, noise_level=args.noise_level, height=args.H, width=args.W)
            for path, image in images]  # every input checked first
    written = []
    for job in jobs:
        inf.seed_everything(args.seed)
        written += inf.sample_prompts(args, prompts, job)
    print(f"Your samples are ready and waiting for you here:\n{args.outdir}\nEnjoy.")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and sample; user mistakes print one line and return 2."""
    return inf.run_cli(get_parser(), generate, argv)


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
