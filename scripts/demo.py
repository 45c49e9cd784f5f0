"""The shapes demo (`make demo`): train a small autoencoder, then a text-conditioned latent diffusion model on
procedural shapes with `main.py` on CPU, sample a grid of captions with classifier-free guidance and score it.
Each stage is time-budgeted (lightning.trainer.max_time): on a busy machine it trains fewer steps, finishes in time
and prints how many steps it trained.

    python scripts/demo.py                                   # train both stages, sample, score
    python scripts/demo.py --ldm-logdir logs/demo/<run>      # sample and score a trained LDM run only
    python scripts/demo.py --ae-logdir logs/demo/<run>       # reuse a trained autoencoder, train the LDM

Scores: caption adherence (the share of samples whose shape and colour, read from pixels by
`ldm.data.shapes.judge_shape_image`, are the caption's) and the autoencoder's PSNR on held-out shapes.
Outputs in --outdir: grid.png (rows: background × shape, columns: colour × seed), samples/*.png (one per
sample, named by caption and seed) and scores.json.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from ldm.data.shapes import BACKGROUNDS, COLORS, SHAPES, ShapesValidation, caption_of  # noqa: E402
from ldm.evaluation.shapes import autoencoder_scores, caption_adherence  # noqa: E402
from ldm.inference import make_sampler, resolve_eta, sample_latents, text_conditioning, to_uint8  # noqa: E402
from ldm.sampling import SAMPLERS  # noqa: E402
from ldm.util import CheckpointError, atomic_path, instantiate_from_config, read_checkpoint  # noqa: E402

AE_CONFIG = "configs/autoencoder/shapes-kl-f2.yaml"
LDM_CONFIG = "configs/latent-diffusion/shapes-ldm-kl-2.yaml"
AE_NAME, LDM_NAME = "shapes-ae", "shapes-ldm"
TOKENIZER_KEY = "model.params.cond_stage_config.params.tokenizer_path"
# the defaults: minutes per stage (12 of the 15: setup, startup, sampling and scoring take the rest), and how the
# LDM is sampled (see README, Demo)
AE_MINUTES, LDM_MINUTES = 3.0, 9.0
SAMPLER, STEPS, SCALE = "euler", 50, 3.0
CELL = 64  # grid cell side in pixels (samples upscaled, nearest neighbour)


class DemoError(RuntimeError):
    """A user-facing failure: printed as one line, exit status 2."""


def get_parser() -> argparse.ArgumentParser:
    """The demo's flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--logdir", default="logs/demo", help="where main.py puts the two runs (main.py -l)")
    add("--outdir", default="outputs/demo", help="where grid.png, samples/ and scores.json go")
    add("--ae-logdir", help="a trained shapes autoencoder run: skip stage 1")
    add("--ldm-logdir", help="a trained shapes LDM run: skip training, only sample and score")
    add("--ckpt", help="score this checkpoint of the LDM run instead of checkpoints/last.ckpt")
    add("--ae-minutes", type=float, default=AE_MINUTES, help="autoencoder training time (lightning.trainer.max_time)")
    add("--ldm-minutes", type=float, default=LDM_MINUTES, help="LDM training time (lightning.trainer.max_time)")
    add("--ae-override", action="append", default=[], metavar="KEY=VALUE", help="extra dotlist for stage 1")
    add("--ldm-override", action="append", default=[], metavar="KEY=VALUE", help="extra dotlist for stage 2")
    add("--seeds", type=int, default=2, help="samples per caption")
    add("--backgrounds", nargs="+", default=list(BACKGROUNDS), choices=list(BACKGROUNDS))
    add("--sampler", default=SAMPLER, choices=list(SAMPLERS), metavar="NAME",
        help=f"a sampler of ldm.sampling.SAMPLERS (default {SAMPLER}: {', '.join(SAMPLERS)})")
    add("--steps", type=int, default=STEPS, help="sampling steps")
    add("--scale", type=float, default=SCALE, help="classifier-free guidance scale")
    add("--psnr-images", type=int, default=256, help="held-out shapes for the autoencoder PSNR")
    return parser


def max_time(minutes: float) -> str:
    """Lightning's DD:HH:MM:SS for a number of minutes."""
    seconds = max(int(round(minutes * 60)), 1)
    return f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def latest_run(logdir: str, name: str) -> Path:
    """The newest `<logdir>/<timestamp>_<name>` run directory."""
    runs = sorted(glob.glob(os.path.join(logdir, f"*_{name}")))
    if not runs:
        raise DemoError(f"no run named '*_{name}' in {logdir}")
    return Path(runs[-1])


def trained_steps(checkpoint: Path) -> int:
    """The optimisation steps a checkpoint records (Lightning's global_step; prune_ckpt keeps it as metadata)."""
    try:
        _, meta = read_checkpoint(str(checkpoint))
    except CheckpointError as err:
        raise DemoError(str(err))
    if "global_step" not in meta:
        raise DemoError(f"checkpoint {checkpoint} records no global_step (is it a main.py checkpoint?)")
    return meta["global_step"]


def checkpoint_of(run: Path, ckpt: str | None = None) -> Path:
    """`ckpt`, or `<run>/checkpoints/last.ckpt`; a DemoError naming the path when it is missing."""
    path = Path(ckpt) if ckpt else run / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise DemoError(f"checkpoint {path} does not exist (is {run} a finished main.py run?)")
    return path


def run_command(command: Sequence[str], what: str) -> None:
    """Print and run a repository command line (`python ...` with this interpreter); a DemoError if it fails."""
    print("$ " + " ".join(command), flush=True)
    result = subprocess.run([sys.executable, *command[1:]], cwd=REPO)
    if result.returncode != 0:
        raise DemoError(f"{command[1]} failed (exit status {result.returncode}) {what}")


def train_stage(config: str, name: str, logdir: str, minutes: float, overrides: Sequence[str]) -> Path:
    """Train with main.py (printing its command line) and return the new run directory."""
    logdir = os.path.abspath(logdir)
    command = ["python", "main.py", "--base", config, "-t", "--no-test", "-l", logdir, "-n", name,
               f"lightning.trainer.max_time={max_time(minutes)}", *overrides]
    before = set(glob.glob(os.path.join(logdir, f"*_{name}")))
    run_command(command, f"training {config}")
    new = sorted(set(glob.glob(os.path.join(logdir, f"*_{name}"))) - before)
    run = Path(new[-1]) if new else latest_run(logdir, name)
    steps = trained_steps(checkpoint_of(run))
    print(f"{config}: trained {steps} steps in at most {minutes:g} min", flush=True)
    return run


def ema_first_stage(ae_run: Path) -> Path:
    """The autoencoder's EMA weights as fp32 safetensors beside its last.ckpt, made with scripts/prune_ckpt.py
    (the way published first stages ship): the LDM's first_stage_config.params.ckpt_path."""
    ckpt = checkpoint_of(ae_run)
    out = ckpt.with_name("last-ema-fp32.safetensors")
    command = ["python", "scripts/prune_ckpt.py", str(ckpt), "--ema", "--dtype", "fp32", "--out", str(out)]
    run_command(command, f"on {ckpt}")
    if not out.is_file():
        raise DemoError(f"scripts/prune_ckpt.py did not write {out}")
    return out


def project_config(run: Path) -> Any:
    """The model config main.py saved in `<run>/configs/*-project.yaml` (the newest when resumed)."""
    files = sorted(glob.glob(str(run / "configs" / "*-project.yaml")))
    if not files:
        raise DemoError(f"{run}/configs has no *-project.yaml: is {run} a main.py run directory?")
    config = OmegaConf.load(files[-1])
    tokenizer = OmegaConf.select(config, TOKENIZER_KEY)
    if tokenizer and not os.path.isabs(tokenizer) and not os.path.isdir(tokenizer) and (REPO / tokenizer).is_dir():
        OmegaConf.update(config, TOKENIZER_KEY, str(REPO / tokenizer))
    return config


def load_ldm(run: Path, ckpt: str | None = None) -> Any:
    """The LatentDiffusion of a run, with the weights of its checkpoint (first stage included), in eval mode."""
    config = project_config(run)
    # the first stage's weights are part of the LDM checkpoint: do not read the autoencoder run again
    OmegaConf.update(config, "model.params.first_stage_config.params.ckpt_path", None)
    model = instantiate_from_config(config.model, path="model")
    path = checkpoint_of(run, ckpt)
    try:
        state, _ = read_checkpoint(str(path))
        model.load_state_dict(state, strict=True)
    except CheckpointError as err:
        raise DemoError(str(err))
    except RuntimeError as err:
        raise DemoError(f"checkpoint {path} does not fit the model of {run}/configs: {str(err).splitlines()[0]}")
    return model.eval()


def demo_captions(backgrounds: Sequence[str]) -> list[str]:
    """Every shape in every colour on each background, in grid order (background, shape, colour)."""
    return [caption_of(shape, color, bg) for bg in backgrounds for shape in SHAPES for color in COLORS]


@torch.no_grad()
def sample_captions(model: Any, captions: Sequence[str], seeds: Sequence[int], steps: int, scale: float,
                    sampler_name: str = SAMPLER, batch_size: int = 64) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W), one per (caption, seed) pair, by a registry sampler (its default eta; 0 for
    ddim) with classifier-free guidance and the EMA weights; each sample's noise comes from its own seed, so it does
    not depend on the batch."""
    shape = (model.channels, model.image_size, model.image_size)
    sampler = make_sampler(sampler_name, model)
    images = []
    with model.ema_scope():
        for start in range(0, len(captions), batch_size):
            caps, batch_seeds = list(captions[start:start + batch_size]), list(seeds[start:start + batch_size])
            c, uc = text_conditioning(model, caps, scale)
            z = sample_latents(sampler, steps, c, uc, scale, resolve_eta(sampler_name, None), shape, batch_seeds)
            images.append(model.decode_first_stage(z).clamp(-1, 1))
    return torch.cat(images)


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG under a temporary name in the same folder, then rename it into place."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def labelled_grid(pixels: np.ndarray, backgrounds: Sequence[str], n_seeds: int) -> Image.Image:
    """Rows background × shape, columns colour × seed, with the colour names on top and 'shape / background'
    on the left; `pixels` in the order of `demo_captions` with the seeds innermost."""
    label_w, label_h = 120, 18
    rows, cols = len(backgrounds) * len(SHAPES), len(COLORS) * n_seeds
    grid = Image.new("RGB", (label_w + cols * CELL, label_h + rows * CELL), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, color in enumerate(COLORS):
        draw.text((label_w + j * n_seeds * CELL + 4, 3), color, fill=(0, 0, 0))
    for i in range(rows):
        bg, shape = backgrounds[i // len(SHAPES)], SHAPES[i % len(SHAPES)]
        draw.text((4, label_h + i * CELL + CELL // 2 - 6), f"{shape} / {bg}", fill=(0, 0, 0))
        for j in range(cols):
            tile = Image.fromarray(pixels[i * cols + j]).resize((CELL, CELL), Image.Resampling.NEAREST)
            grid.paste(tile, (label_w + j * CELL, label_h + i * CELL))
    return grid


def write_outputs(outdir: Path, pixels: np.ndarray, captions: Sequence[str], seeds: Sequence[int],
                  backgrounds: Sequence[str], n_seeds: int, scores: dict[str, Any]) -> None:
    """grid.png, samples/<caption>_seed<k>.png and scores.json in `outdir`."""
    for image, caption, seed in zip(pixels, captions, seeds):
        save_png(Image.fromarray(image), outdir / "samples" / f"{caption.replace(' ', '-')}_seed{seed}.png")
    save_png(labelled_grid(pixels, backgrounds, n_seeds), outdir / "grid.png")
    with atomic_path(outdir / "scores.json") as tmp, open(tmp, "w") as f:
        json.dump(scores, f, indent=2)


def evaluate(run: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Sample the demo captions from the LDM of `run`, write the outputs and return the scores."""
    torch.manual_seed(0)
    model = load_ldm(run, args.ckpt)
    per_caption = demo_captions(args.backgrounds)
    captions = [c for c in per_caption for _ in range(args.seeds)]
    seeds = [k for _ in per_caption for k in range(args.seeds)]
    pixels = to_uint8(sample_captions(model, captions, seeds, args.steps, args.scale, args.sampler))
    adherence = caption_adherence(list(pixels), captions)
    # held-out shapes of the run's own validation data (its size_range), at the autoencoder's resolution
    params = OmegaConf.select(project_config(run), "data.params.validation.params", default=None) or {}
    size_range = {"size_range": list(params["size_range"])} if "size_range" in params else {}
    held_out = ShapesValidation(size=model.first_stage_model.encoder.resolution, length=args.psnr_images,
                                **size_range)
    # the same judge on the autoencoder's reconstructions of real shapes: the most the LDM's samples can reach
    ae_psnr, ae_adherence = autoencoder_scores(model.first_stage_model, held_out, args.psnr_images)
    checkpoint = checkpoint_of(run, args.ckpt)
    scores = {"run": str(run), "checkpoint": str(checkpoint), "ldm_steps": trained_steps(checkpoint),
              "adherence": adherence.overall,
              "per_shape": adherence.shape_rates(), "per_color": adherence.color_rates(), "ae_psnr_db": ae_psnr,
              "ae_reconstruction_adherence": ae_adherence.overall,
              "sampler": args.sampler, "sampling_steps": args.steps, "guidance_scale": args.scale,
              "samples": [{"caption": c, "seed": s, "judged": list(j)}
                          for c, s, j in zip(captions, seeds, adherence.judged)]}
    write_outputs(Path(args.outdir), pixels, captions, seeds, args.backgrounds, args.seeds, scores)
    print(f"LDM checkpoint {checkpoint} ({scores['ldm_steps']} steps), {args.sampler} {args.steps} steps, "
          f"guidance {args.scale:g}")
    print(adherence.report())
    print(f"autoencoder PSNR on {ae_adherence.total} held-out shapes: {ae_psnr:.2f} dB; the judge agrees with the captions "
          f"of {100 * ae_adherence.overall:.1f}% of their reconstructions")
    print(f"grid: {Path(args.outdir) / 'grid.png'} (rows: background x shape, columns: colour x seed)")
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stages that are not given as finished runs, with the wall time of each."""
    args = get_parser().parse_args(argv)
    times: list[tuple[str, float]] = []
    try:
        if args.ldm_logdir:
            ldm_run = Path(args.ldm_logdir)
            if not ldm_run.is_dir():
                raise DemoError(f"--ldm-logdir {ldm_run} is not a directory")
        else:
            if args.ae_logdir:
                ae_run = Path(args.ae_logdir)
            else:
                start = time.monotonic()
                ae_run = train_stage(AE_CONFIG, AE_NAME, args.logdir, args.ae_minutes, args.ae_override)
                times.append(("autoencoder training", time.monotonic() - start))
            ae_ckpt = ema_first_stage(ae_run).resolve()
            start = time.monotonic()
            ldm_run = train_stage(LDM_CONFIG, LDM_NAME, args.logdir, args.ldm_minutes,
                                  [f"model.params.first_stage_config.params.ckpt_path={ae_ckpt}", *args.ldm_override])
            times.append(("LDM training", time.monotonic() - start))
        start = time.monotonic()
        evaluate(ldm_run, args)
        times.append(("sampling + scoring", time.monotonic() - start))
    except DemoError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    for stage, seconds in times:
        print(f"time {stage}: {seconds / 60:.1f} min ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
