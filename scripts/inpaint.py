"""Inpainting: fill the white region of each mask in its image; the rest of the image is kept as it is.

    python scripts/inpaint.py --indir data/inpainting_examples --outdir outputs/inpainting_results
    python scripts/inpaint.py --image photo.png --mask photo_mask.png --prompt "a red circle" -r logs/<run>

--indir holds pairs `name.png` + `name_mask.png` (white = fill in); results are written as <outdir>/<name>.png
with PNG metadata. Three kinds of checkpoints work:
- inpainting models (`LatentInpaintDiffusion`, SD 2 inpainting: a 9-channel UNet that also sees the mask and the
  masked image's latent, and the prompt by cross-attention);
- latent-diffusion's inpainting model (`LatentDiffusion` with concat conditioning on the masked image through the
  first stage, plus the mask);
- any other text-conditioned or unconditional model: the known region's latent is pasted in at every DDIM step
  (`DDIMSampler.sample(mask=..., x0=...)`, where mask 1 marks what is kept).
In every case the unmasked pixels of the result are the input's.
"""
from __future__ import annotations

import argparse
import glob
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
from ldm.pipelines import Inpaint, InpaintInput, inpaint_input  # noqa: E402

DEFAULT_CONFIG = "configs/stable-diffusion/v2-inpainting-inference.yaml"
DEFAULT_CKPT = "models/ldm/inpainting/512-inpainting-ema.ckpt"


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


def read_jobs(pairs: Sequence[tuple[str, str, str]], multiple: int, device: torch.device) -> list[InpaintInput]:
    """Read every image and mask before anything is sampled; sizes must agree and fit the model."""
    return [inpaint_input(inf.read_image(image_path, "--image"), inf.read_image(mask_path, "--mask", mode="L"),
                          image_path, mask_path, multiple, device) for _, image_path, mask_path in pairs]


def generate(args: argparse.Namespace) -> list[str]:
    """Inpaint every pair; returns the written paths."""
    inf.check_counts(args)
    pairs = find_pairs(args)
    model, device, ckpt = inf.load_from_args(args)
    jobs = read_jobs(pairs, inf.image_multiple(model), device)
    task = Inpaint(model, ckpt, steps=args.steps, scale=args.scale, eta=args.ddim_eta, prompt=args.prompt,
                   precision=args.precision)
    if not args.prompt and inf.is_text_model(model):
        print("note: --prompt is empty; the model fills the region unconditionally")
    written = []
    for i, ((name, _, _), job) in enumerate(zip(pairs, tqdm(jobs, desc="Inpainting"))):
        samples = task(job, args.seed + i)
        path = os.path.join(args.outdir, name)
        inf.save_png(inf.to_uint8(samples.images)[0], path, samples.metadata[0])
        written.append(path)
    print(f"Inpainted {len(written)} image(s) into {args.outdir}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and inpaint; user mistakes print one line and return 2."""
    return inf.run_cli(get_parser(), generate, argv)


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
