"""Layout-to-image and semantic synthesis: sample a model conditioned on bounding-box layouts or label maps.

    python scripts/sample_conditional.py -r logs/<layout run> --layout layout.json --n_samples 4
    python scripts/sample_conditional.py -r logs/<semantic run> --segmentation labels.png
    python scripts/sample_conditional.py -r logs/<run> --from-data 8          # the run's first validation inputs
    python scripts/sample_conditional.py -r logs/<layout run> --layout layout.json --H 32 --W 32   # beyond training

A layout file is JSON: one layout [{"class": "red circle", "bbox": [x0, y0, w, h]}, ...] (class names from the
model's bbox_tokenizer_config, or numbers; boxes in [0, 1] image coordinates), or a list of layouts. A label map is
a grayscale or palette PNG holding one label index per pixel; the output has its size (any multiple of the model's
factor: a larger map samples a larger image, the UNet being convolutional). Writes <outdir>/samples/NNNNN.png (with
the conditioning, seed and settings as PNG metadata) and <outdir>/grid-NNNN.png: one row per input, the input drawn
first (the layout's boxes, or the label map in colour). Sample k of input i has the seed --seed + i * n_samples + k.
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
from ldm.pipelines import MapToImage  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

LABEL_COLORS = ((64, 64, 64), (30, 118, 179), (255, 126, 13), (43, 159, 43), (213, 38, 39), (147, 102, 188),
                (139, 85, 74), (226, 118, 193), (126, 126, 126), (187, 188, 33), (22, 189, 206))


def get_parser() -> argparse.ArgumentParser:
    """Conditioning inputs, sampling flags as txt2img.py's, model flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--layout", help="a JSON file with one layout or a list of layouts (layout-to-image)")
    source.add_argument("--segmentation", nargs="+", help="label-map image(s) (semantic synthesis)")
    source.add_argument("--from-data", dest="from_data", type=int, metavar="N",
                        help="the first N conditioning inputs of the model's validation data (its config's data)")
    add("--outdir", default="outputs/conditional-samples", help="where to write")
    inf.add_sampler_flags(parser)
    add("--H", type=int, default=None, help="image height in pixels for layouts (default: the model's)")
    add("--W", type=int, default=None, help="image width in pixels for layouts (default: the model's)")
    add("--steps", "--ddim_steps", dest="steps", type=int, default=50, help="sampling steps")
    add("--ddim_eta", type=float, default=0.0, help="eta of DDIM (0: deterministic)")
    add("--n_samples", type=int, default=4, help="samples per input")
    add("--scale", type=float, default=1.0, help="guidance scale (these models have no null input: keep 1)")
    add("--seed", type=int, default=42, help="seed of the first sample")
    add("--skip_grid", action="store_true", help="do not write the grid")
    inf.add_model_flags(parser)
    return parser


def data_inputs(config, key: str, count: int) -> torch.Tensor:
    """The first `count` values of `key` in the validation (else train) dataset of the model's config."""
    data = config.get("data", {}).get("params", {})
    spec = data.get("validation") or data.get("train")
    if spec is None:
        raise inf.ScriptError("--from-data: the model's config has no data.params.validation (or train) dataset")
    dataset = instantiate_from_config(spec)
    if count < 1 or count > len(dataset):
        raise inf.ScriptError(f"--from-data {count}: the dataset holds {len(dataset)} examples")
    return torch.stack([torch.as_tensor(dataset[i][key]) for i in range(count)])


def drawn(job: MapToImage, value: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An input as a picture [3, H, W] in [-1, 1]: the layout's boxes, or the label map in colour."""
    if job.kind == "semantic":
        colors = torch.tensor(LABEL_COLORS, dtype=torch.float32)[:value.shape[-1]] / 127.5 - 1.0
        return colors[value.argmax(-1)].permute(2, 0, 1)
    reader = getattr(job.model, "bbox_tokenizer", None)
    if reader is None:
        return -torch.ones(3, *size)
    labels = reader.label if min(size) >= 64 else (lambda category: "")  # no room for names in small images
    return reader.plot(value, labels, figure_size=(size[1], size[0]), line_width=1, font_size=8)


def generate(args: argparse.Namespace) -> list[str]:
    """Sample every input n_samples times; returns the written paths."""
    inf.check_counts(args)
    device = inf.pick_device(args.device)
    files, ckpt = inf.resolve_model_files(args.config, args.ckpt, args.resume, args.default_config, args.default_ckpt)
    config, model = inf.load_model(files, ckpt, device, use_ema=args.ema)
    native = int(model.image_size) * inf.first_stage_factor(model)
    name = inf.sampler_name(args)
    job = MapToImage(model, ckpt, sampler=name, steps=args.steps, scale=args.scale, eta=inf.sampler_eta(args, name),
                     spacing=args.spacing, guidance_rescale=args.guidance_rescale, height=args.H or native,
                     width=args.W or native, precision=args.precision)
    if args.from_data is not None:
        inputs = data_inputs(config, job.key, args.from_data)
    else:
        inputs = job.read_inputs(args.layout, args.segmentation)
    inf.seed_everything(args.seed)
    written, rows = [], []
    for value, samples in zip(inputs, tqdm(job.sample_each(inputs, args.seed, args.n_samples), total=len(inputs),
                                           desc="Sampling")):
        written += inf.save_samples(samples.images, os.path.join(args.outdir, "samples"), samples.metadata)
        rows.append(torch.cat([drawn(job, value, tuple(samples.images.shape[-2:]))[None], samples.images]))
    if not args.skip_grid:
        meta = {key: value for key, value in samples.metadata[0].items() if key not in ("seed", job.kind)}
        written.append(inf.save_grid(torch.cat(rows), args.outdir, args.n_samples + 1, meta))
    print(f"Your samples are ready and waiting for you here:\n{args.outdir}\nEnjoy.")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and sample; user mistakes print one line and return 2."""
    return inf.run_cli(get_parser(), generate, argv)


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
