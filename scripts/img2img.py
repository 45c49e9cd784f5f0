"""Image-to-image (SDEdit, Meng et al. 2022): noise an image's latent part of the way, then denoise it with DDIM.

    python scripts/img2img.py --init-img sketch.png --prompt "a fantasy landscape" --strength 0.75 --ckpt sd-v1.ckpt
    python scripts/img2img.py -r logs/<run> --init-img shape.png --prompt "a red circle on a white background"

--strength s in [0, 1] runs the last s * steps DDIM steps: 0 returns the image through the autoencoder, 1 starts
from (almost) pure noise. The image is encoded to its latent posterior's mode, cropped down to a multiple of the
model's downsampling factor; outputs and metadata as txt2img.py (plus strength and the init image's name).
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

import torch  # noqa: E402

from ldm import inference as inf  # noqa: E402
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.sampling.noise import SeededNoise  # noqa: E402

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
    inf.add_guidance_rescale_flag(parser)
    inf.add_model_flags(parser, DEFAULT_CONFIG, DEFAULT_CKPT)
    return parser


def load_init_image(path: str, multiple: int, device: torch.device) -> torch.Tensor:
    """The image as (1, 3, H, W) in [-1, 1], cropped to sides that are multiples of `multiple`."""
    image = inf.read_image(path, "--init-img")
    width, height = (side - side % multiple for side in image.size)
    if width == 0 or height == 0:
        raise inf.ScriptError(f"--init-img: '{path}' is {image.size[0]}x{image.size[1]}; both sides must be at least "
                              f"{multiple} pixels (the model's downsampling factor)")
    if (width, height) != image.size:
        print(f"cropping {path} from {image.size[0]}x{image.size[1]} to {width}x{height}")
        image = image.crop((0, 0, width, height))
    return inf.image_to_tensor(image, device)


def check_flags(args: argparse.Namespace, model: object) -> None:
    """--strength in [0, 1], --C and --f the model's."""
    if not 0.0 <= args.strength <= 1.0:
        raise inf.ScriptError(f"--strength must lie in [0, 1], got {args.strength}")
    inf.check_latent_flags(args, model)


def renoise_and_denoise(sampler: DDIMSampler, z0: torch.Tensor, t_enc: int, c: object, uc: object, scale: float,
                        seeds: Sequence[int], guidance_rescale: float = 0.0) -> torch.Tensor:
    """Noise z0 to DDIM step t_enc - 1 with per-sample seeded noise, then run the first t_enc steps back."""
    if t_enc == 0:
        return z0
    noise = SeededNoise(seeds, z0.device).randn(z0.shape)
    t = torch.full((z0.shape[0],), t_enc - 1, dtype=torch.long, device=z0.device)
    z_enc = sampler.stochastic_encode(z0, t, noise=noise)
    return sampler.decode(z_enc, c, t_enc, unconditional_guidance_scale=scale, unconditional_conditioning=uc,
                          guidance_rescale=guidance_rescale)


def generate(args: argparse.Namespace) -> list[str]:
    """Edit the init image for every prompt n_iter times; returns the written paths."""
    inf.check_counts(args)
    prompts = inf.read_prompts(args.from_file) if args.from_file else [args.prompt or ""]
    model, device, ckpt = inf.load_from_args(args)
    check_flags(args, model)
    init = load_init_image(args.init_img, inf.image_multiple(model), device)
    inf.check_steps("ddim", args.steps, args.ddim_eta, model)
    inf.seed_everything(args.seed)
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=args.steps, ddim_eta=args.ddim_eta, verbose=False)
    t_enc = int(args.strength * args.steps)
    common = dict(sampler="ddim", steps=args.steps, scale=args.scale, eta=args.ddim_eta, strength=args.strength,
                  t_enc=t_enc, init_image=os.path.basename(args.init_img), checkpoint=inf.checkpoint_label(ckpt))
    with torch.no_grad(), inf.autocast(args.precision, device):
        z_init = inf.encode_image(model, init)

        def sample_batch(batch: list[str], seeds: list[int]) -> torch.Tensor:
            c, uc = inf.prompt_conditioning(model, batch, args.scale)
            z0 = z_init.expand(len(batch), *z_init.shape[1:])
            return model.decode_first_stage(renoise_and_denoise(sampler, z0, t_enc, c, uc, args.scale, seeds,
                                                                args.guidance_rescale))

        return inf.sample_prompts(args, prompts, common, sample_batch)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and sample; user mistakes print one line and return 2."""
    return inf.run_cli(get_parser(), generate, argv)


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
