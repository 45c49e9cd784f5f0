"""Text-to-image sampling with the Stable Diffusion command line.

    python scripts/txt2img.py --prompt "a red circle on a white background" --plms --ckpt sd-v1.ckpt
    python scripts/txt2img.py -r logs/<run> --prompt "..." --H 16 --W 16 --ddim_steps 50   # a main.py run

Writes <outdir>/samples/NNNNN.png (numbered after the files already there) and <outdir>/grid-NNNN.png, each with
PNG text metadata (prompt, seed, sampler, steps, scale, eta, checkpoint). Sample k of iteration n uses the seed
`--seed + n * n_samples + k` (with --fixed_code: `--seed + k`, the same start codes every iteration): its
metadata seed regenerates it alone, whatever the batch.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ldm import inference as inf  # noqa: E402

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


def latent_shape(args: argparse.Namespace, model: object) -> tuple[int, int, int]:
    """(C, H/f, W/f), with --C and --f checked against the model."""
    inf.check_latent_flags(args, model)
    factor = inf.first_stage_factor(model)
    inf.check_size(args.H, args.W, inf.image_multiple(model))
    return model.channels, args.H // factor, args.W // factor


def generate(args: argparse.Namespace) -> list[str]:
    """Sample every prompt n_iter times; returns the written paths."""
    inf.sampler_name(args)  # conflicting sampler flags fail before the model loads
    inf.check_counts(args)
    prompts = inf.read_prompt_flags(args)
    model, device, ckpt = inf.load_from_args(args)
    if not inf.is_text_model(model):
        raise inf.ScriptError(f"the model of '{ckpt}' is not conditioned on text (cond_stage_key "
                              f"{getattr(model, 'cond_stage_key', None)!r}); use scripts/sample_diffusion.py")
    shape = latent_shape(args, model)
    name, sampler, eta = inf.sampler_from_args(args, model, args.steps)
    inf.seed_everything(args.seed)
    common = dict(sampler=name, schedule=args.spacing, steps=args.steps, scale=args.scale, eta=eta,
                  guidance_rescale=args.guidance_rescale or None, checkpoint=inf.checkpoint_label(ckpt), H=args.H,
                  W=args.W)

    def sample_batch(batch: list[str], seeds: list[int]) -> torch.Tensor:
        c, uc = inf.text_conditioning(model, batch, args.scale)
        z = inf.sample_latents(sampler, args.steps, c, uc, args.scale, eta, shape, seeds,
                               guidance_rescale=args.guidance_rescale)
        return model.decode_first_stage(z)

    with torch.no_grad(), inf.autocast(args.precision, device):
        return inf.sample_prompts(args, prompts, common, sample_batch)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and sample; user mistakes print one line and return 2."""
    return inf.run_cli(get_parser(), generate, argv)


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
