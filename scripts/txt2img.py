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
import os
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from tqdm import trange  # noqa: E402

from ldm import inference as inf  # noqa: E402

DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"


def add_model_flags(parser: argparse.ArgumentParser, default_config: str | None = DEFAULT_CONFIG,
                    default_ckpt: str | None = DEFAULT_CKPT) -> None:
    """--config, --ckpt, -r/--resume, --ema, --device, --precision (shared by the image scripts)."""
    add = parser.add_argument
    add("--config", default=None, help=f"model config (default: the run's configs with -r, else {default_config})")
    add("--ckpt", default=None, help=f"checkpoint (.ckpt or .safetensors) or a main.py run directory "
                                     f"(default: {default_ckpt})")
    add("-r", "--resume", default=None, metavar="LOGDIR",
        help="a main.py run logs/<run> (or a checkpoint inside it): its configs and checkpoints/last.ckpt")
    add("--ema", action="store_true", help="sample with the checkpoint's EMA weights (model_ema.*)")
    add("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    add("--precision", choices=inf.PRECISIONS, default="autocast",
        help="autocast: fp16 on CUDA, fp32 on CPU; bf16: bfloat16 autocast; full: fp32")
    parser.set_defaults(default_config=default_config, default_ckpt=default_ckpt)


def add_sampling_flags(parser: argparse.ArgumentParser, n_iter: int, n_samples: int, scale: float) -> None:
    """--steps/--ddim_steps, --ddim_eta, --n_iter, --n_samples, --n_rows, --scale, --seed, --fixed_code, outputs."""
    add = parser.add_argument
    add("--steps", "--ddim_steps", dest="steps", type=int, default=50, help="sampling steps")
    add("--ddim_eta", type=float, default=0.0, help="eta of DDIM (0: deterministic)")
    add("--n_iter", type=int, default=n_iter, help="sample this often")
    add("--n_samples", type=int, default=n_samples, help="samples per prompt and iteration (the batch size)")
    add("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    add("--scale", type=float, default=scale, help="classifier-free guidance scale (1: none)")
    add("--seed", type=int, default=42, help="seed of the first sample")
    add("--fixed_code", action="store_true", help="the same start codes in every iteration")
    add("--skip_grid", action="store_true", help="do not write the grid")
    add("--skip_save", action="store_true", help="do not write the individual samples")


def get_parser() -> argparse.ArgumentParser:
    """The flags of the original txt2img.py (plus -r/--resume, --dpm, --device, --ema)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar",
        help="the prompt to render")
    add("--from-file", dest="from_file", type=str, help="a file with one prompt per line (instead of --prompt)")
    add("--outdir", type=str, nargs="?", default="outputs/txt2img-samples", help="where to write")
    add("--plms", action="store_true", help="PLMS sampling")
    add("--dpm", action="store_true", help="DPM-Solver++(2M) sampling")
    add("--H", type=int, default=512, help="image height in pixels")
    add("--W", type=int, default=512, help="image width in pixels")
    add("--C", type=int, default=None, help="latent channels (default: the model's)")
    add("--f", type=int, default=None, help="first-stage downsampling factor (default: the model's)")
    add_sampling_flags(parser, n_iter=3, n_samples=3, scale=7.5)
    add_model_flags(parser)
    return parser


def sampler_name(args: argparse.Namespace) -> str:
    """ddim, plms or dpm from the flags."""
    if args.plms and args.dpm:
        raise inf.ScriptError("--plms and --dpm exclude each other")
    return "plms" if args.plms else "dpm" if args.dpm else "ddim"


def check_counts(args: argparse.Namespace) -> None:
    """--n_samples, --n_iter and --steps must be positive."""
    for flag in ("n_samples", "n_iter", "steps"):
        if getattr(args, flag) < 1:
            raise inf.ScriptError(f"--{flag} must be at least 1, got {getattr(args, flag)}")


def load(args: argparse.Namespace) -> tuple[object, torch.device, str]:
    """(model, device, checkpoint path) from the model flags."""
    device = inf.pick_device(args.device)
    files, ckpt = inf.resolve_model_files(args.config, args.ckpt, args.resume, args.default_config,
                                          args.default_ckpt)
    _, model = inf.load_model(files, ckpt, device, use_ema=args.ema)
    return model, device, ckpt


def latent_shape(args: argparse.Namespace, model: object) -> tuple[int, int, int]:
    """(C, H/f, W/f), with --C and --f checked against the model."""
    factor = inf.first_stage_factor(model)
    if args.f is not None and args.f != factor:
        raise inf.ScriptError(f"--f {args.f} differs from the model's first-stage downsampling factor {factor}")
    if args.C is not None and args.C != model.channels:
        raise inf.ScriptError(f"--C {args.C} differs from the model's latent channels {model.channels}")
    inf.check_size(args.H, args.W, inf.image_multiple(model))
    return model.channels, args.H // factor, args.W // factor


def generate(args: argparse.Namespace) -> list[str]:
    """Sample every prompt n_iter times; returns the written paths."""
    name = sampler_name(args)
    check_counts(args)
    prompts = inf.read_prompts(args.from_file) if args.from_file else [args.prompt]
    if not args.from_file and not (args.prompt or "").strip():
        raise inf.ScriptError("--prompt is empty; give a prompt (or --from-file)")
    model, device, ckpt = load(args)
    if not inf.is_text_model(model):
        raise inf.ScriptError(f"the model of '{ckpt}' is not conditioned on text (cond_stage_key "
                              f"{getattr(model, 'cond_stage_key', None)!r}); use scripts/sample_diffusion.py")
    shape = latent_shape(args, model)
    inf.check_steps(name, args.steps, args.ddim_eta, model)
    inf.seed_everything(args.seed)
    sampler = inf.make_sampler(name, model)
    common = dict(sampler=name, steps=args.steps, scale=args.scale, eta=args.ddim_eta if name == "ddim" else None,
                  checkpoint=inf.checkpoint_label(ckpt), H=args.H, W=args.W)
    written, all_images, all_meta = [], [], []
    # one prompt: batches of n_samples copies; a prompt file: its prompts in batches of n_samples (as the original)
    batches = [prompts * args.n_samples] if len(prompts) == 1 else list(inf.batched(prompts, args.n_samples))
    with torch.no_grad(), inf.autocast(args.precision, device):
        for n in trange(args.n_iter, desc="Sampling"):
            for b, batch in enumerate(batches):
                first = args.seed if args.fixed_code else args.seed + (n * len(batches) + b) * args.n_samples
                seeds = [first + k for k in range(len(batch))]
                c, uc = inf.text_conditioning(model, batch, args.scale)
                z = inf.sample_latents(sampler, args.steps, c, uc, args.scale, args.ddim_eta, shape, seeds)
                images = model.decode_first_stage(z).float().clamp(-1, 1)
                meta = [inf.sample_metadata(prompt=p, seed=s, **common) for p, s in zip(batch, seeds)]
                if not args.skip_save:
                    written += inf.save_samples(images, os.path.join(args.outdir, "samples"), meta)
                all_images.append(images.cpu())
                all_meta += meta
    if not args.skip_grid:
        grid_meta = inf.sample_metadata(prompt=prompts[0] if len(prompts) == 1 else repr(prompts),
                                        seed=repr([m["seed"] for m in all_meta]), **common)
        written.append(inf.save_grid(torch.cat(all_images), args.outdir, args.n_rows or args.n_samples, grid_meta))
    print(f"Your samples are ready and waiting for you here:\n{args.outdir}\nEnjoy.")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and sample; user mistakes print one line and return 2."""
    args = get_parser().parse_args(argv)
    return inf.run_cli(lambda: generate(args))


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
