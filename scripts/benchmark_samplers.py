"""Sampler speed at equal quality (issue 10, item 5): the samplers' own cost beyond the model calls, and sample
quality against the number of model evaluations on a trained text-to-image shapes LDM.

    python scripts/benchmark_samplers.py --ldm logs/<run>_shapes-ldm            # both tables
    python scripts/benchmark_samplers.py --ldm logs/<run>_shapes-ldm --skip-quality
    python scripts/benchmark_samplers.py --skip-quality                         # overhead on a tiny random LDM

(a) Overhead: every registered sampler runs `--steps` (50) steps with classifier-free guidance on the model.
"run" is the wall time of the whole call, "model" the time spent inside the UNet's forward (timed by hooks around
it); overhead = run - model, everything else: the sampler's own arithmetic, the denoiser's scaling and parameter
conversion, the guidance batching and combination. "alone" is the same sampler with a no-op denoiser (x * 0.9),
its pure loop cost. Medians of --repeats runs, measured side by side in one process.

(b) Quality against model evaluations (NFE): DDIM, PLMS, DPM++ 2M Karras, UniPC and Euler (--quality-samplers),
each with its registry spacing (karras / linspace) or, where that starts below sigma_max (DDIM's and PLMS's
"uniform"), the "trailing" one, so that every sampler starts from the same x_T at the same level and ends at 0.
Two measures per (sampler, NFE):
- latent error: RMS distance of the final latents of the first --ref-samples samples to a --ref-steps DPM++ 2M
  Karras solution of the same probability-flow ODE from the same noise, relative to that solution's RMS (the
  reference's own error is printed: its distance to a run of half its steps);
- caption adherence: the share of decoded samples whose shape and colour, judged from pixels by
  `ldm.evaluation.shapes.caption_adherence`, are their caption's (every shape x colour x background, as the demo).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ldm.data.shapes import BACKGROUNDS, COLORS, SHAPES, caption_of  # noqa: E402
from ldm.evaluation.shapes import caption_adherence  # noqa: E402
from ldm.inference import ScriptError, load_model, pick_device, resolve_model_files, run_cli, to_uint8  # noqa: E402
from ldm.sampling import SAMPLERS, SeededNoise  # noqa: E402
from ldm.sampling.denoiser import model_denoiser  # noqa: E402
from ldm.sampling.schedule import spacing  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

QUALITY_SAMPLERS = ("ddim", "plms", "dpmpp_2m", "unipc", "euler")
LABELS = {"dpmpp_2m": "DPM++ 2M Karras"}


def get_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--ldm", help="a trained text-to-image shapes LDM: a main.py run directory or a checkpoint in one "
                      "(default for the overhead table: a tiny LDM with random weights)")
    add("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    add("--threads", type=int, default=None, help="torch CPU threads (on a shared CPU 1 avoids OpenMP contention)")
    add("--scale", type=float, default=4.0, help="classifier-free guidance scale")
    add("--steps", type=int, default=50, help="steps of the overhead runs")
    add("--batch", type=int, default=8, help="samples per overhead run")
    add("--repeats", type=int, default=3, help="overhead runs per sampler (the median is printed)")
    add("--samplers", nargs="+", default=None, help="samplers of the overhead table (default: every registered one)")
    add("--skip-quality", action="store_true", help="only the overhead table")
    add("--quality-samplers", nargs="+", default=list(QUALITY_SAMPLERS))
    add("--nfe", type=int, nargs="+", default=[5, 10, 20, 50], help="model-evaluation budgets of the quality table")
    add("--seeds", type=int, default=1, help="samples per caption in the quality table")
    add("--ref-samples", type=int, default=16, help="samples whose latents are compared with the reference")
    add("--ref-steps", type=int, default=1000, help="steps of the reference solution")
    return parser


# ----------------------------------------------------------------------------------------- models
def tiny_ldm() -> Any:
    """A text-conditioned LDM of the shapes demo's architecture with random weights (for the overhead table)."""
    config = OmegaConf.load(REPO / "configs" / "latent-diffusion" / "shapes-ldm-kl-4.yaml")
    OmegaConf.update(config, "model.params.first_stage_config.params.ckpt_path", None)
    tokenizer = OmegaConf.select(config, "model.params.cond_stage_config.params.tokenizer_path")
    if tokenizer and not Path(tokenizer).is_absolute():
        OmegaConf.update(config, "model.params.cond_stage_config.params.tokenizer_path", str(REPO / tokenizer))
    torch.manual_seed(0)
    return instantiate_from_config(config.model).eval()


def load_ldm(path: str | None, device: torch.device) -> Any:
    """The LDM of a run (EMA weights), or the tiny random one when no run is given."""
    if path is None:
        return tiny_ldm().to(device)
    files, ckpt = resolve_model_files(None, path)
    _, model = load_model(files, ckpt, device, use_ema=True)
    return model


def conditioning(model: Any, captions: Sequence[str]) -> tuple[Any, Any]:
    """(c, uc) for the captions and the empty caption."""
    with torch.no_grad():
        return model.get_learned_conditioning(list(captions)), model.get_learned_conditioning([""] * len(captions))


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ModelTimer:
    """Sums the time spent inside a module's forward (hooks before and after it)."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.device, self.seconds, self.calls, self._start = device, 0.0, 0, 0.0
        self.handles = [module.register_forward_pre_hook(self._before), module.register_forward_hook(self._after)]

    def _before(self, *_: Any) -> None:
        sync(self.device)
        self._start = time.perf_counter()

    def _after(self, *_: Any) -> None:
        sync(self.device)
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def reset(self) -> None:
        """Start a new measurement."""
        self.seconds, self.calls = 0.0, 0

    def remove(self) -> None:
        """Take the hooks off."""
        for handle in self.handles:
            handle.remove()


# ----------------------------------------------------------------------------------------- runs
def quality_spacing(name: str, schedule: Any) -> str:
    """The sampler's registry spacing, or "trailing" where that starts below sigma_max or does not end at 0."""
    spec = SAMPLERS[name]
    first = float(spacing(spec.spacing, 4, schedule, final=spec.final)[0])
    return spec.spacing if first >= schedule.sigma_max * (1 - 1e-9) and spec.final == "zero" else "trailing"


def levels(name: str, steps: int, schedule: Any, same_start: bool = False) -> torch.Tensor:
    """The sampler's registry levels; with `same_start` those of `quality_spacing`, ending at 0."""
    spec = SAMPLERS[name]
    if same_start:
        return spacing(quality_spacing(name, schedule), steps, schedule, final="zero")
    return spacing(spec.spacing, steps, schedule, final=spec.final)


def sample(name: str, denoise: Callable, sigmas: torch.Tensor, x_T: torch.Tensor, seeds: Sequence[int],
           schedule: Any) -> torch.Tensor:
    """One sampler run from x_T (the process scale) with per-sample seeded noise."""
    noise = SeededNoise(seeds, x_T.device)
    with torch.no_grad():
        return SAMPLERS[name].fn(denoise, sigmas, schedule.to_ve(x_T, sigmas[0]), noise=noise)


def overhead_table(model: Any, names: Sequence[str], args: argparse.Namespace, device: torch.device) -> None:
    """Part (a): run, model and overhead times of every sampler at --steps steps."""
    seeds = list(range(args.batch))
    shapes, colors = list(SHAPES), list(COLORS)
    c, uc = conditioning(model, [caption_of(shapes[i % len(shapes)], colors[i % len(colors)], list(BACKGROUNDS)[0])
                                 for i in seeds])
    x_T = SeededNoise(seeds, device).randn((args.batch, model.channels, model.image_size, model.image_size))
    denoise = model_denoiser(model, c, uc, args.scale)
    timer = ModelTimer(model.model.diffusion_model, device)
    noop = lambda x, sigma: x * 0.9  # noqa: E731
    print(f"\n(a) sampler overhead: {args.steps} steps, batch {args.batch}, guidance {args.scale}, device {device}, "
          f"median of {args.repeats}")
    print(f"{'sampler':<20} {'NFE':>4} {'run ms':>9} {'model ms':>9} {'overhead ms':>12} {'overhead':>9} "
          f"{'alone ms':>9} {'alone':>7}")
    try:
        for name in names:
            sigmas = levels(name, args.steps, model.schedule)
            sample(name, denoise, sigmas, x_T, seeds, model.schedule)  # warm-up
            runs, models, alone = [], [], []
            for _ in range(args.repeats):
                timer.reset()
                sync(device)
                start = time.perf_counter()
                sample(name, denoise, sigmas, x_T, seeds, model.schedule)
                sync(device)
                runs.append(time.perf_counter() - start)
                models.append(timer.seconds)
                start = time.perf_counter()
                sample(name, noop, sigmas, x_T, seeds, model.schedule)
                sync(device)
                alone.append(time.perf_counter() - start)
            run, net, solo = (statistics.median(v) * 1e3 for v in (runs, models, alone))
            share = 100 * (run - net) / run
            print(f"{name:<20} {timer.calls:>4} {run:>9.1f} {net:>9.1f} {run - net:>12.1f} {share:>8.2f}% "
                  f"{solo:>9.1f} {100 * solo / run:>6.2f}%")
    finally:
        timer.remove()


def steps_for(name: str, budget: int, schedule: Any, x: torch.Tensor) -> tuple[int, int]:
    """(steps, NFE): the most steps whose run takes at most `budget` model evaluations (counted on a no-op model)."""
    for steps in range(budget, 0, -1):
        calls = []
        with torch.no_grad():
            SAMPLERS[name].fn(lambda z, s: calls.append(1) or z * 0.9, levels(name, steps, schedule, True), x,
                              noise=SeededNoise(list(range(x.shape[0]))))
        if len(calls) <= budget:
            return steps, len(calls)
    raise ScriptError(f"--nfe {budget}: sampler '{name}' needs more model evaluations than that for one step")


def quality_table(model: Any, args: argparse.Namespace, device: torch.device) -> None:
    """Part (b): latent error against the reference and caption adherence against NFE."""
    captions = [caption_of(s, col, bg) for bg in BACKGROUNDS for s in SHAPES for col in COLORS
                for _ in range(args.seeds)]
    seeds = list(range(len(captions)))
    shape = (model.channels, model.image_size, model.image_size)
    x_T = SeededNoise(seeds, device).randn((len(seeds), *shape))
    c, uc = conditioning(model, captions)
    denoise = model_denoiser(model, c, uc, args.scale)
    n_ref = min(args.ref_samples, len(seeds))
    ref_denoise = model_denoiser(model, c[:n_ref], uc[:n_ref], args.scale)
    start = time.perf_counter()
    reference = sample("dpmpp_2m", ref_denoise, spacing("karras", args.ref_steps, model.schedule), x_T[:n_ref],
                       seeds[:n_ref], model.schedule)
    half = sample("dpmpp_2m", ref_denoise, spacing("karras", args.ref_steps // 2, model.schedule), x_T[:n_ref],
                  seeds[:n_ref], model.schedule)
    scale = reference.pow(2).mean().sqrt()
    print(f"\n(b) quality against model evaluations: {len(captions)} captions (every shape x colour x background, "
          f"{args.seeds} seed(s) each), guidance {args.scale}; latent error on {n_ref} samples against DPM++ 2M "
          f"Karras with {args.ref_steps} steps (its distance to {args.ref_steps // 2} steps: "
          f"{float((half - reference).pow(2).mean().sqrt() / scale):.1e}; {time.perf_counter() - start:.0f} s)")
    print(f"{'sampler':<16} {'spacing':<10} " + " ".join(f"{'NFE ' + str(b):>17}" for b in args.nfe))
    print(f"{'':<16} {'':<10} " + " ".join(f"{'error / adherence':>17}" for _ in args.nfe))
    for name in args.quality_samplers:
        cells = []
        for budget in args.nfe:
            steps, nfe = steps_for(name, budget, model.schedule, x_T[:1])
            sigmas = levels(name, steps, model.schedule, same_start=True)
            z = sample(name, denoise, sigmas, x_T, seeds, model.schedule)
            error = float((z[:n_ref] - reference).pow(2).mean().sqrt() / scale)
            with torch.no_grad():
                pixels = to_uint8(model.decode_first_stage(z).clamp(-1, 1))
            adherence = caption_adherence(list(pixels), captions).overall
            cells.append(f"{error:>8.3f} / {100 * adherence:>4.1f}%" + ("*" if nfe != budget else " "))
        row = " ".join(f"{cell:>17}" for cell in cells)
        print(f"{LABELS.get(name, name):<16} {quality_spacing(name, model.schedule):<10} {row}")
    print("(* fewer evaluations than the budget: the sampler's steps do not divide it)")


def check_names(flag: str, names: Sequence[str]) -> None:
    """A ScriptError naming the flag when a sampler name is not registered."""
    unknown = [name for name in names if name not in SAMPLERS]
    if unknown:
        raise ScriptError(f"{flag}: unknown sampler(s) {', '.join(unknown)}; registered: {', '.join(SAMPLERS)}")


def main(args: argparse.Namespace) -> None:
    """Both tables (or the overhead one)."""
    check_names("--samplers", args.samplers or [])
    if not args.skip_quality:
        check_names("--quality-samplers", args.quality_samplers)
        if args.ldm is None:
            raise ScriptError("the quality table needs a trained shapes LDM: pass --ldm logs/<run> (or --skip-quality)")
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_ldm(args.ldm, device)
    unet = sum(p.numel() for p in model.model.parameters()) / 1e6
    print(f"model: {args.ldm or 'tiny random shapes LDM'} ({model.parameterization}-prediction, latent "
          f"{model.channels}x{model.image_size}x{model.image_size}, {unet:.1f} M UNet parameters); "
          f"torch threads {torch.get_num_threads()}")
    overhead_table(model, args.samplers or list(SAMPLERS), args, device)
    if not args.skip_quality:
        quality_table(model, args, device)


if __name__ == "__main__":
    sys.exit(run_cli(get_parser(), main))
