"""Sample an unconditional or class-conditional diffusion model (latent-diffusion's sample_diffusion.py).

    python scripts/sample_diffusion.py -r logs/<run> -n 64 --batch_size 16 -c 50 -e 0.0
    python scripts/sample_diffusion.py -r logs/<run>/checkpoints/last.ckpt -n 8 --vanilla_sample
    python scripts/sample_diffusion.py -r logs/<cin run> -n 8 --classes 207 360 --scale 3.0

Writes to -l/--logdir (default: <run>/samples/<checkpoint>/<now>/): sample_NNNNNN.png (numbered after the files
there, with metadata), <n>x<H>x<W>x3-samples.npz (arr_0: all samples, uint8 NHWC; arr_1: their class labels for
class-conditional models) and sampling_config.yaml (the flags and the checkpoint). Sample i uses the seed
--seed + i; the EMA weights are used when the model keeps them (as the original).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ldm import inference as inf  # noqa: E402
from ldm.util import atomic_path  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    """The original flags (-r, -n, -e, -v, -l, -c, --batch_size) plus seeds, classes, guidance and devices."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("-r", "--resume", type=str, default=None, help="a main.py run logs/<run> or a checkpoint inside it")
    add("--config", type=str, default=None, help="model config (instead of the run's)")
    add("--ckpt", type=str, default=None, help="checkpoint (with --config, instead of -r)")
    add("-n", "--n_samples", type=int, default=50000, help="number of samples to draw")
    add("-e", "--eta", type=float, default=None,
        help="eta of DDIM (default 1.0) or of another stochastic sampler (default: its own); not with -v")
    add("-v", "--vanilla_sample", action="store_true", help="ancestral sampling over all training timesteps")
    add("-l", "--logdir", type=str, default=None, help="output folder (default: <run>/samples/<ckpt>/<now>)")
    add("-c", "--custom_steps", type=int, default=50, help="sampling steps (ignored with --vanilla_sample)")
    inf.add_sampler_flags(parser, eta_flag=False)
    add("--batch_size", type=int, default=10, help="samples per batch")
    add("--seed", type=int, default=0, help="sample i uses seed + i")
    add("--classes", type=int, nargs="+", default=None,
        help="class labels for class-conditional models, repeated over the samples (default: 0, 1, 2, ...)")
    add("--scale", type=float, default=1.0, help="classifier-free guidance scale for class-conditional models")
    add("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    add("--precision", choices=inf.PRECISIONS, default="full", help="see txt2img.py")
    return parser


def check_flags(args: argparse.Namespace) -> None:
    """Counts positive; guidance needs DDIM."""
    for flag, value in (("-n/--n_samples", args.n_samples), ("--batch_size", args.batch_size),
                        ("-c/--custom_steps", args.custom_steps)):
        if value < 1:
            raise inf.ScriptError(f"{flag} must be at least 1, got {value}")
    if args.vanilla_sample and args.scale != 1.0:
        raise inf.ScriptError("--scale needs DDIM sampling; drop -v/--vanilla_sample")
    inf.sampler_name(args)


def labels_for(args: argparse.Namespace, model: object) -> list[int] | None:
    """One class label per sample for class-conditional models; None for unconditional ones."""
    if inf.is_class_model(model):
        n_classes = getattr(model.cond_stage_model, "n_classes", args.n_samples)
        if args.classes and not all(0 <= label < n_classes for label in args.classes):
            raise inf.ScriptError(f"--classes: labels must lie in [0, {n_classes - 1}], got {args.classes}")
        cycle = args.classes or list(range(n_classes))
        return [cycle[i % len(cycle)] for i in range(args.n_samples)]
    if inf.is_text_model(model):
        raise inf.ScriptError("the model is conditioned on text; use scripts/txt2img.py")
    if inf.is_conditional(model):
        raise inf.ScriptError(f"the model is conditioned on '{model.cond_stage_key}'; this script samples "
                              "unconditional and class-conditional models")
    if args.classes:
        raise inf.ScriptError("--classes given but the model is unconditional")
    return None


def sample_batch(model: object, args: argparse.Namespace, seeds: list[int], labels: list[int] | None,
                 sampler: object = None, eta: float | None = None) -> torch.Tensor:
    """Images in [-1, 1] for one batch: the sampler with custom_steps, or ancestral sampling with --vanilla_sample."""
    shape = (model.channels, model.image_size, model.image_size)
    c = uc = None
    if labels is not None:
        c, uc = inf.class_conditioning(model, labels, args.scale)
    if args.vanilla_sample:
        z = model.p_sample_loop((len(seeds), *shape), cond=c, seeds=seeds, verbose=False)
    else:
        z = inf.sample_latents(sampler, args.custom_steps, c, uc, args.scale, eta, shape, seeds,
                               guidance_rescale=args.guidance_rescale)
    decode = getattr(model, "decode_first_stage", None)
    return (decode(z) if decode is not None else z).float().clamp(-1, 1)


def default_outdir(ckpt: str) -> str:
    """<run>/samples/<checkpoint name>/<now> (beside the checkpoint when it is not in a run)."""
    run = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    if os.path.basename(os.path.dirname(os.path.abspath(ckpt))) != "checkpoints":
        run = os.path.dirname(os.path.abspath(ckpt))
    now = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    return os.path.join(run, "samples", Path(ckpt).stem, now)


def generate(args: argparse.Namespace) -> str:
    """Draw the samples and write them; returns the output folder."""
    check_flags(args)
    device = inf.pick_device(args.device)
    files, ckpt = inf.resolve_model_files(args.config, args.ckpt, args.resume)
    _, model = inf.load_model(files, ckpt, device)
    labels = labels_for(args, model)
    method, sampler, eta = "ancestral", None, None
    if not args.vanilla_sample:
        method, sampler, eta = inf.sampler_from_args(args, model, args.custom_steps, ddim_default=1.0)
    outdir = args.logdir or default_outdir(ckpt)
    inf.seed_everything(args.seed)
    seeds = list(range(args.seed, args.seed + args.n_samples))
    images = []
    with torch.no_grad(), inf.autocast(args.precision, device), model.ema_scope():
        for batch in tqdm(list(inf.batched(range(args.n_samples), args.batch_size)), desc="Sampling batches"):
            batch_labels = None if labels is None else [labels[i] for i in batch]
            x = sample_batch(model, args, [seeds[i] for i in batch], batch_labels, sampler, eta)
            meta = [inf.sample_metadata(seed=seeds[i], class_label=None if labels is None else labels[i],
                                        sampler=method, steps=None if args.vanilla_sample else args.custom_steps,
                                        eta=eta, schedule=args.spacing, scale=args.scale,
                                        checkpoint=inf.checkpoint_label(ckpt)) for i in batch]
            start = inf.next_index(outdir, r"sample_(\d+)\.png")
            for k, (pixels, m) in enumerate(zip(inf.to_uint8(x), meta)):
                inf.save_png(pixels, os.path.join(outdir, f"sample_{start + k:06}.png"), m)
            images.append(inf.to_uint8(x))
    all_images = np.concatenate(images)
    n, h, w, _ = all_images.shape
    arrays = [all_images] if labels is None else [all_images, np.asarray(labels, dtype=np.int64)]
    with atomic_path(os.path.join(outdir, f"{n}x{h}x{w}x3-samples.npz")) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, *arrays)
    config = {"sampling": {**vars(args), "ckpt": ckpt, "configs": files, "sampler": method}}
    with atomic_path(os.path.join(outdir, "sampling_config.yaml")) as tmp:
        OmegaConf.save(OmegaConf.create(config), tmp)
    print(f"{n} samples written to {outdir}")
    return outdir


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and sample; user mistakes print one line and return 2."""
    return inf.run_cli(get_parser(), generate, argv)


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
