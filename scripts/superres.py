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

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ldm import inference as inf  # noqa: E402
from ldm.sampling.noise import SeededNoise  # noqa: E402

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
    inf.add_sampler_flags(parser)
    add("--prompt", default="", help="text guiding the x4 upscaler")
    add("--scale", type=float, default=9.0, help="classifier-free guidance scale for the x4 upscaler (1: none)")
    add("--noise_level", type=int, default=20, help="noise augmentation of the input for the x4 upscaler")
    add("--seed", type=int, default=42, help="seed of the first image (image i uses seed + i)")
    inf.add_model_flags(parser, DEFAULT_CONFIG, DEFAULT_CKPT)
    return parser


def kind_of(model: object, ckpt: str) -> str:
    """'upscaler' (LatentUpscaleDiffusion) or 'concat' (latent-diffusion SR); anything else is a user error."""
    if hasattr(model, "low_scale_model"):
        return "upscaler"
    if getattr(model.model, "conditioning_key", None) == "concat" and model.cond_stage_model is not None:
        return "concat"
    raise inf.ScriptError(f"the model of '{ckpt}' is not a super-resolution model: expected LatentUpscaleDiffusion "
                          "or a LatentDiffusion with conditioning_key concat on an image")


def conditioning(model: object, kind: str, low: torch.Tensor, args: argparse.Namespace,
                 seed: int) -> tuple[object, object, float, tuple[int, int]]:
    """(c, uc, guidance scale, latent size) for one low-resolution image in [-1, 1]."""
    if kind == "concat":
        c = model.get_learned_conditioning(low)
        expected = getattr(model.model.diffusion_model, "in_channels", model.channels + c.shape[1])
        if model.channels + c.shape[1] != expected:
            raise inf.ScriptError(f"the model's UNet takes {expected} input channels, not {model.channels} latent + "
                                  f"{c.shape[1]} conditioning channels: it is not an image-concat SR model")
        return c, None, 1.0, tuple(c.shape[-2:])
    max_level = getattr(model.low_scale_model, "max_noise_level", None)
    if not 0 <= args.noise_level < (max_level or model.low_scale_model.num_timesteps):
        raise inf.ScriptError(f"--noise_level must lie in [0, {max_level}), got {args.noise_level}")
    level = torch.full((low.shape[0],), args.noise_level, dtype=torch.long, device=low.device)
    noise = SeededNoise([seed], low.device).randn(low.shape)
    augmented, level = model.low_scale_model(low, noise_level=level, noise=noise)
    text, text_uc = inf.prompt_conditioning(model, [args.prompt], args.scale)
    c = {"c_concat": [augmented], "c_crossattn": [text], "c_adm": level}
    uc = None if text_uc is None else {"c_concat": [augmented], "c_crossattn": [text_uc], "c_adm": level}
    return c, uc, args.scale, tuple(augmented.shape[-2:])


def generate(args: argparse.Namespace) -> list[str]:
    """Upscale every image; returns the written paths."""
    inf.check_counts(args)
    model, device, ckpt = inf.load_from_args(args)
    kind = kind_of(model, ckpt)
    lows = [(path, inf.image_to_tensor(inf.read_image(path, "--image"), device)) for path in args.image]
    name, sampler, eta = inf.sampler_from_args(args, model, args.steps)
    unet_multiple = inf.image_multiple(model) // inf.first_stage_factor(model)
    written = []
    with torch.no_grad(), inf.autocast(args.precision, device):
        prepared = [(path, *conditioning(model, kind, low, args, args.seed + i)) for i, (path, low) in enumerate(lows)]
        for path, _, _, _, size in prepared:  # every input checked before anything is sampled
            if size[0] % unet_multiple or size[1] % unet_multiple:
                raise inf.ScriptError(f"--image: '{path}' gives a {size[0]}x{size[1]} latent; its sides must be "
                                      f"multiples of {unet_multiple} (the UNet's downsampling)")
        for i, (path, c, uc, scale, size) in enumerate(tqdm(prepared, desc="Upscaling")):
            seed = args.seed + i
            z = inf.sample_latents(sampler, args.steps, c, uc, scale, eta, (model.channels, *size), [seed],
                                   guidance_rescale=args.guidance_rescale)
            image = model.decode_first_stage(z).float().clamp(-1, 1)
            meta = inf.sample_metadata(prompt=args.prompt if kind == "upscaler" else None, seed=seed, sampler=name,
                                       schedule=args.spacing, steps=args.steps, scale=scale, eta=eta, mode=kind,
                                       noise_level=args.noise_level if kind == "upscaler" else None,
                                       image=os.path.basename(path), checkpoint=inf.checkpoint_label(ckpt))
            out = os.path.join(args.outdir, Path(path).stem + ".png")
            inf.save_png(inf.to_uint8(image)[0], out, meta)
            written.append(out)
    print(f"Upscaled {len(written)} image(s) into {args.outdir}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and upscale; user mistakes print one line and return 2."""
    return inf.run_cli(get_parser(), generate, argv)


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
