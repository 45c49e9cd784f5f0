"""Inpainting: fill the white region of each mask in its image; the rest of the image is kept as it is.

    python scripts/inpaint.py --indir data/inpainting_examples --outdir outputs/inpainting_results
    python scripts/inpaint.py --image photo.png --mask photo_mask.png --prompt "a red circle" -r logs/<run>

--indir holds pairs `name.png` + `name_mask.png` (white = fill in); results are written as <outdir>/<name>.png
with PNG metadata. Three kinds of checkpoints work:
- inpainting models (`LatentInpaintDiffusion`, SD 2 inpainting: a 9-channel UNet that also sees the mask and the
  masked image's latent, and the prompt by cross-attention);
- latent-diffusion's inpainting model (`LatentDiffusion` with concat conditioning on the masked image through the
  first stage, plus the mask);
- any other text-conditioned or unconditional model: the known region's latent is pasted in at every step
  (the sampler's `mask` / `x0`, where mask 1 marks what is kept; any `--sampler`).
In every case the unmasked pixels of the result are the input's.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ldm import inference as inf  # noqa: E402

DEFAULT_CONFIG = "configs/stable-diffusion/v2-inpainting-inference.yaml"
DEFAULT_CKPT = "models/ldm/inpainting/512-inpainting-ema.ckpt"


@dataclass
class Job:
    """One image with its mask (1 = fill in), both (1, C, H, W) on the device."""

    name: str
    image_path: str
    mask_path: str
    image: torch.Tensor
    mask: torch.Tensor


def get_parser() -> argparse.ArgumentParser:
    """latent-diffusion's inpaint.py flags (--indir, --outdir, --steps) plus a single --image/--mask pair,
    a prompt and guidance for text models, seeds, and the model flags of the other scripts."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--indir", type=str, help="folder with name.png + name_mask.png pairs")
    add("--image", type=str, help="one image (with --mask)")
    add("--mask", type=str, help="its mask: white = fill in, black = keep")
    add("--outdir", type=str, default="outputs/inpainting_results", help="where to write")
    add("--steps", "--ddim_steps", dest="steps", type=int, default=50, help="DDIM steps")
    add("--ddim_eta", type=float, default=0.0, help="eta of DDIM (0: deterministic)")
    inf.add_sampler_flags(parser)
    add("--prompt", type=str, default="", help="what to paint, for text-conditioned models")
    add("--scale", type=float, default=1.0, help="classifier-free guidance scale for text models (1: none)")
    add("--seed", type=int, default=42, help="seed of the first image (image i uses seed + i)")
    inf.add_model_flags(parser, DEFAULT_CONFIG, DEFAULT_CKPT)
    return parser


def find_pairs(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(name, image path, mask path) from --indir or --image/--mask."""
    if bool(args.indir) == bool(args.image or args.mask):
        raise inf.ScriptError("give either --indir or --image with --mask")
    if args.image or args.mask:
        if not (args.image and args.mask):
            raise inf.ScriptError("--image and --mask go together")
        return [(os.path.basename(args.image), args.image, args.mask)]
    if not os.path.isdir(args.indir):
        raise inf.ScriptError(f"--indir: '{args.indir}' is not a directory")
    masks = sorted(glob.glob(os.path.join(args.indir, "*_mask.png")))
    if not masks:
        raise inf.ScriptError(f"--indir: '{args.indir}' holds no name_mask.png files (with name.png beside each)")
    pairs = []
    for mask in masks:
        image = mask[: -len("_mask.png")] + ".png"
        if not os.path.isfile(image):
            raise inf.ScriptError(f"--indir: mask '{mask}' has no image '{image}' beside it")
        pairs.append((os.path.basename(image), image, mask))
    return pairs


def read_jobs(pairs: Sequence[tuple[str, str, str]], multiple: int, device: torch.device) -> list[Job]:
    """Read every image and mask before anything is sampled; sizes must agree and fit the model."""
    jobs = []
    for name, image_path, mask_path in pairs:
        image = inf.read_image(image_path, "--image")
        mask = inf.read_image(mask_path, "--mask", mode="L")
        if image.size != mask.size:
            raise inf.ScriptError(f"--mask: '{mask_path}' is {mask.size[0]}x{mask.size[1]} but its image "
                                  f"'{image_path}' is {image.size[0]}x{image.size[1]}; they must be the same size")
        if image.size[0] % multiple or image.size[1] % multiple:
            raise inf.ScriptError(f"--image: '{image_path}' is {image.size[0]}x{image.size[1]}; both sides must be "
                                  f"multiples of {multiple}, the model's downsampling factor")
        jobs.append(Job(name, image_path, mask_path, inf.image_to_tensor(image, device),
                        inf.mask_to_tensor(mask, device)))
    return jobs


def kind_of(model: object) -> str:
    """'inpainting' (mask and masked image concatenated, SD 2), 'ldm-inpainting' (latent-diffusion's concat
    model on the first stage) or 'sampler-mask' (any other model)."""
    if hasattr(model, "concat_conditioning") and getattr(model, "masked_image_key", None):
        return "inpainting"
    if model.model.conditioning_key == "concat" and model.cond_stage_model is model.first_stage_model:
        return "ldm-inpainting"
    return "sampler-mask"


def inpaint_latent(model: object, sampler: object, job: Job, args: argparse.Namespace, seed: int,
                   kind: str, eta: float | None = None) -> torch.Tensor:
    """The sampled latent for one job."""
    masked = job.image * (1 - job.mask)
    factor = inf.first_stage_factor(model)
    size = (job.image.shape[2] // factor, job.image.shape[3] // factor)
    shape = (model.channels, *size)
    sample = dict(sampler=sampler, steps=args.steps, scale=args.scale, eta=eta, shape=shape, seeds=[seed],
                  guidance_rescale=args.guidance_rescale)
    if kind == "ldm-inpainting":  # latent-diffusion's inpaint.py: masked image through the first stage, then mask
        c = model.get_learned_conditioning(masked)
        c = torch.cat([c, F.interpolate(job.mask, size=c.shape[-2:])], dim=1)
        return inf.sample_latents(c=c, uc=None, **{**sample, "scale": 1.0})
    c, uc = inf.prompt_conditioning(model, [args.prompt], args.scale)
    if kind == "inpainting":
        batch = {"mask": job.mask.permute(0, 2, 3, 1), model.masked_image_key: masked.permute(0, 2, 3, 1)}
        cc = model.concat_conditioning(batch, size, 1)
        cond = {"c_concat": [cc], "c_crossattn": [c]}
        uncond = None if uc is None else {"c_concat": [cc], "c_crossattn": [uc]}
        return inf.sample_latents(c=cond, uc=uncond, **sample)
    known = 1.0 - inf.downsample_mask(job.mask, factor)  # the samplers keep x0 where mask == 1
    x0 = inf.encode_image(model, job.image)
    return inf.sample_latents(c=c, uc=uc, mask=known, x0=x0, **sample)


def generate(args: argparse.Namespace) -> list[str]:
    """Inpaint every pair; returns the written paths."""
    inf.check_counts(args)
    pairs = find_pairs(args)
    model, device, ckpt = inf.load_from_args(args)
    jobs = read_jobs(pairs, inf.image_multiple(model), device)
    name, sampler, eta = inf.sampler_from_args(args, model, args.steps)
    if not args.prompt and inf.is_text_model(model):
        print("note: --prompt is empty; the model fills the region unconditionally")
    kind = kind_of(model)
    written = []
    with torch.no_grad(), inf.autocast(args.precision, device):
        for i, job in enumerate(tqdm(jobs, desc="Inpainting")):
            seed = args.seed + i
            predicted = model.decode_first_stage(inpaint_latent(model, sampler, job, args, seed, kind, eta))
            result = (1 - job.mask) * job.image + job.mask * predicted.float().clamp(-1, 1)
            meta = inf.sample_metadata(prompt=args.prompt, seed=seed, sampler=name, schedule=args.spacing,
                                       steps=args.steps, scale=args.scale, eta=eta, mode=kind,
                                       image=os.path.basename(job.image_path), mask=os.path.basename(job.mask_path),
                                       checkpoint=inf.checkpoint_label(ckpt))
            path = os.path.join(args.outdir, job.name)
            inf.save_png(inf.to_uint8(result)[0], path, meta)
            written.append(path)
    print(f"Inpainted {len(written)} image(s) into {args.outdir}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and inpaint; user mistakes print one line and return 2."""
    return inf.run_cli(get_parser(), generate, argv)


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
