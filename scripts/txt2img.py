"""Text-to-image sampling with the Stable Diffusion command line.

    python scripts/txt2img.py --prompt "a red circle on a white background" --plms --ckpt sd-v1.ckpt
    python scripts/txt2img.py -r logs/<run> --prompt "..." --H 16 --W 16 --ddim_steps 50   # a main.py run

Writes <outdir>/samples/NNNNN.png (numbered after the files already there) and <outdir>/grid-NNNN.png, each with
PNG text metadata (prompt, seed, sampler, schedule, steps, scale, eta, guidance_rescale, checkpoint; those not set
are left out). Sample k of iteration n uses the seed `--seed + n * n_samples + k` (with --fixed_code: `--seed + k`,
the same start codes every iteration): its metadata seed regenerates it alone, whatever the batch.

The flags of SD v1 and v2 are here: --laion400m (v1's latent-diffusion text-to-image model), --repeat,
--torchscript, --ipex and --bf16 (v2), and v1's safety checker (--safety_checker FOLDER) and invisible watermark
(--watermark [TEXT]) as options.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ldm import acceleration  # noqa: E402
from ldm import inference as inf  # noqa: E402
from ldm.pipelines import Samples, Txt2Img  # noqa: E402
from ldm.safety import WATERMARK_V1, SafetyChecker, Watermarker, flag_metadata  # noqa: E402

DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
DEFAULT_OUTDIR = "outputs/txt2img-samples"
# SD v1's --laion400m: latent-diffusion's LAION-400M text-to-image model
LAION400M = {"config": "configs/latent-diffusion/txt2img-1p4B-eval.yaml", "ckpt": "models/ldm/text2img-large/model.ckpt",
             "outdir": "outputs/txt2img-samples-laion400m"}


def get_parser() -> argparse.ArgumentParser:
    """The flags of the original txt2img.py of SD v1 and v2 (plus -r/--resume, --sampler and its options, --ema)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    inf.add_prompt_flags(parser, outdir=DEFAULT_OUTDIR)
    inf.add_sampler_flags(parser)
    add = parser.add_argument
    add("--H", type=int, default=512, help="image height in pixels")
    add("--W", type=int, default=512, help="image width in pixels")
    inf.add_sampling_flags(parser, n_iter=3, n_samples=3, scale=7.5)
    inf.add_model_flags(parser, DEFAULT_CONFIG, DEFAULT_CKPT)
    add("--vae-tiling", dest="vae_tiling", type=int, nargs="?", const=32, default=None, metavar="TILE",
        help="decode in overlapping latent tiles of TILE (default 32) pixels: memory bounded by a tile")
    add("--vae-slicing", dest="vae_slicing", action="store_true", help="decode the batch one image at a time")
    add("--laion400m", action="store_true",
        help=f"the LAION-400M model of SD v1's script: --config {LAION400M['config']} --ckpt {LAION400M['ckpt']}")
    add("--repeat", type=int, default=1, help="repeat each prompt of --from-file this often")
    add("--torchscript", action="store_true", help="trace the UNet and the decoder with TorchScript")
    add("--ipex", action="store_true", help="optimise with Intel Extension for PyTorch (must be installed)")
    add("--bf16", action="store_true", help="bfloat16 autocast (--precision bf16)")
    add("--safety_checker", default=None, metavar="FOLDER",
        help="SD v1's safety checker from a local folder (CompVis/stable-diffusion-safety-checker); flagged "
             "images are written black")
    add("--watermark", nargs="?", const=WATERMARK_V1, default=None, metavar="TEXT",
        help=f"embed SD v1's invisible watermark (default text {WATERMARK_V1}; images of at least 256x256)")
    return parser


def resolve_flags(args: argparse.Namespace, parser_defaults: dict) -> None:
    """--laion400m, --bf16 and --repeat in terms of the other flags, refusing contradictions."""
    if args.laion400m:
        given = [f"--{name}" for name in ("config", "ckpt", "resume") if getattr(args, name)]
        if given:
            raise inf.ScriptError(f"--laion400m picks its own config and checkpoint; drop {' and '.join(given)}")
        args.config, args.ckpt = LAION400M["config"], LAION400M["ckpt"]
        if args.outdir == parser_defaults["outdir"]:
            args.outdir = LAION400M["outdir"]
    if args.bf16:
        if args.precision not in ("autocast", "bf16"):
            raise inf.ScriptError(f"--bf16 and --precision {args.precision} exclude each other")
        args.precision = "bf16"
    if args.repeat < 1:
        raise inf.ScriptError(f"--repeat must be at least 1, got {args.repeat}")
    if args.repeat > 1 and not args.from_file:
        raise inf.ScriptError("--repeat repeats the prompts of --from-file; for one --prompt use --n_samples or "
                              "--n_iter")


def accelerate(args: argparse.Namespace, model, job: Txt2Img, prompts: list[str]) -> None:
    """--ipex and --torchscript on the loaded model (the trace runs on the first batch's conditioning)."""
    if args.bf16:
        note = acceleration.bf16_note(model.device)
        if note:
            print(f"note: {note}", file=sys.stderr)
    if args.ipex:
        acceleration.ipex_optimize(model, bf16=args.bf16)
    if args.torchscript:
        with job.context():
            c, _ = job.conditioning((prompts * args.n_samples)[:args.n_samples])
        acceleration.torchscript(model, job.shape, c, autocast=inf.autocast(args.precision, model.device))


def checked(job: Txt2Img, checker: SafetyChecker):
    """The job with SD v1's safety check on its images (flagged ones black, `nsfw_replaced` in the metadata)."""
    def run(prompts: list[str], seeds: list[int]) -> Samples:
        samples = job(prompts, seeds)
        images, flags = checker(samples.images)
        return Samples(images, [{**meta, **extra} for meta, extra in zip(samples.metadata, flag_metadata(flags))])
    return run


def generate(args: argparse.Namespace) -> list[str]:
    """Sample every prompt n_iter times; returns the written paths."""
    name = inf.sampler_name(args)
    inf.check_counts(args)
    resolve_flags(args, {"outdir": DEFAULT_OUTDIR})
    prompts = [p for p in inf.read_prompt_flags(args) for _ in range(args.repeat)]
    watermark = Watermarker(args.watermark) if args.watermark is not None else None
    if watermark is not None:
        watermark.check_size(args.H, args.W)
    model, device, ckpt = inf.load_from_args(args)
    inf.check_latent_flags(args, model)
    first_stage = model.first_stage_model
    if (args.vae_tiling or args.vae_slicing) and not hasattr(first_stage, "enable_tiling"):
        raise inf.ScriptError(f"--vae-tiling / --vae-slicing: the first stage {type(first_stage).__name__} decodes "
                              "whole images only (AutoencoderKL tiles and slices)")
    if args.vae_tiling:
        if args.vae_tiling < 2:
            raise inf.ScriptError(f"--vae-tiling {args.vae_tiling} must be at least 2 latent pixels")
        first_stage.enable_tiling(args.vae_tiling, overlap=args.vae_tiling // 4)
    if args.vae_slicing:
        first_stage.enable_slicing()
    batches = 1 if len(prompts) == 1 else -(-len(prompts) // args.n_samples)
    inf.compile_by_default(args, model, args.steps * args.n_iter * batches)
    checker = SafetyChecker(args.safety_checker, device) if args.safety_checker else None
    job = Txt2Img(model, ckpt, sampler=name, steps=args.steps, scale=args.scale, eta=inf.sampler_eta(args, name),
                  spacing=args.spacing, guidance_rescale=args.guidance_rescale, height=args.H, width=args.W,
                  precision=args.precision)
    accelerate(args, model, job, prompts)
    inf.seed_everything(args.seed)
    written = inf.sample_prompts(args, prompts, job if checker is None else checked(job, checker), finish=watermark)
    print(f"Your samples are ready and waiting for you here:\n{args.outdir}\nEnjoy.")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and sample; user mistakes print one line and return 2."""
    return inf.run_cli(get_parser(), generate, argv)


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
