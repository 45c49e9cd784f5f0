"""Encode a dataset once into a latent cache: first-stage posterior moments (and frozen text-encoder outputs) as shards.

    python scripts/cache_latents.py -b configs/latent-diffusion/shapes-ldm-kl-4.yaml --out cache/shapes --limit 20000 \
        model.params.first_stage_config.params.ckpt_path=logs/<ae run>/checkpoints/last.ckpt
    python scripts/cache_latents.py -r logs/<ldm run> --split validation --out cache/val --dtype fp16 --text

The model comes from the configs (-b, merged left to right, `key=value` overrides after them; the first stage loads
its own ckpt_path), from --ckpt, or from a main.py run (-r). The images come from the config's `data` section, split
--split, read once in order (a shard data module without shuffling). Writes `<out>/00000.tar`, ... with
`<key>.safetensors` (`moments`, and `context` with --text), `<key>.txt`, `<key>.json`, and `<out>/cache.json` with the
autoencoder's weight hash, scale_factor and the data config (see ldm.data.latent_cache). Train from it with
`data: {target: ldm.data.latent_cache.LatentCacheDataModule, params: {batch_size: ..., train: {cache: <out>}}}`.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from omegaconf import OmegaConf  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from ldm import inference as inf  # noqa: E402
from ldm.data.laion import WebDataModuleFromConfig  # noqa: E402
from ldm.data.latent_cache import build_cache  # noqa: E402
from ldm.training.config import load_config, split_base_and_overrides  # noqa: E402
from ldm.util import DTYPE_NAMES, ConfigError, instantiate_from_config, load_model_from_config  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    """Model, data split, output and encoding flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("-b", "--base", nargs="*", default=[], metavar="config.yaml", help="configs with model: and data:")
    add("-r", "--resume", default=None, metavar="LOGDIR", help="a main.py run: its configs and last.ckpt")
    add("--ckpt", default=None, help="a checkpoint of the whole model (default: the first stage's own ckpt_path)")
    add("--split", default="train", help="the data split to encode (train, validation, test)")
    add("--out", required=True, help="the cache directory")
    add("--dtype", choices=sorted(DTYPE_NAMES), default="bf16", help="dtype the moments (and contexts) are stored in")
    add("--text", action="store_true", help="also cache the frozen cond stage's outputs of the captions")
    add("--batch-size", dest="batch_size", type=int, default=None, help="default: the data config's batch_size")
    add("--limit", type=int, default=None, help="encode at most this many samples")
    add("--samples-per-shard", dest="per_shard", type=int, default=1000)
    add("--num-workers", dest="num_workers", type=int, default=0)
    add("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    add("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.params.scale_factor=0.5")
    return parser


def load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(merged config, model in eval mode, description of where its first stage came from)."""
    files, dotlist = split_base_and_overrides(args.base, args.overrides)
    ckpt = args.ckpt
    if args.resume:
        run_files, ckpt = inf.resolve_model_files(None, None, args.resume)
        files = run_files + files
    if not files:
        raise inf.ScriptError("no config: pass -b config.yaml (with model: and data:) or -r logs/<run>")
    config, _ = load_config(files, dotlist)
    device = inf.pick_device(args.device)
    if ckpt:
        if not os.path.isfile(ckpt):
            raise inf.ScriptError(f"--ckpt: checkpoint '{ckpt}' does not exist")
        model = load_model_from_config(config, ckpt, device=device)
        source = ckpt
    else:
        model = instantiate_from_config(config.model, path="model").to(device).eval()
        source = OmegaConf.select(config, "model.params.first_stage_config.params.ckpt_path") or "(random weights)"
    if not hasattr(model, "first_stage_model"):
        raise inf.ScriptError(f"{type(model).__name__} has no first stage to cache; expected a LatentDiffusion model")
    if args.text and (model.cond_stage_model is None or model.cond_stage_trainable):
        raise inf.ScriptError("--text: the model's cond stage is trained with the UNet (or absent); only a frozen "
                              "text encoder's outputs can be cached")
    return config, model, source


def batches(config: Any, args: argparse.Namespace) -> Iterator[dict]:
    """The split's batches, in order, one pass, at most --limit samples."""
    if "data" not in config:
        raise inf.ScriptError("the config has no data: section to read images from")
    data = instantiate_from_config(config.data, path="data")
    if isinstance(data, WebDataModuleFromConfig):
        if args.split not in data.split_configs:
            raise inf.ScriptError(f"--split: the data config has no '{args.split}' split")
        data.split_configs[args.split].update(shuffle=0, shard_shuffle=False, repeat=False)
        data.batch_size = args.batch_size or data.batch_size
        data.num_workers = args.num_workers
        loader: Any = data.make_loader(args.split)
    else:
        data.prepare_data()
        data.setup("fit")
        if args.split not in data.datasets:
            raise inf.ScriptError(f"--split: the data config has no '{args.split}' split")
        loader = DataLoader(data.datasets[args.split], batch_size=args.batch_size or data.batch_size,
                            shuffle=False, num_workers=args.num_workers)
    left = args.limit if args.limit is not None else float("inf")
    for batch in loader:
        size = len(next(iter(v for v in batch.values() if hasattr(v, "__len__"))))
        if left <= 0:
            return
        if size > left:
            batch = {k: v[: int(left)] for k, v in batch.items()}
        left -= size
        yield batch


def cache(args: argparse.Namespace) -> dict[str, Any]:
    """Write the cache; returns its cache.json contents."""
    config, model, source = load(args)
    extra = {"source": str(source), "data": {"split": args.split,
                                             "config": OmegaConf.to_container(config.data, resolve=True)}}
    try:
        info = build_cache(model, batches(config, args), args.out, args.dtype, args.text, args.per_shard, extra)
    except ConfigError as err:
        raise inf.ScriptError(f"--split {args.split}: {err}") from None
    print(f"{info['num_samples']} samples -> {len(info['shards'])} shard(s) in {args.out} ({args.dtype} moments"
          f"{' and text contexts' if args.text else ''}; first stage {info['first_stage']['hash'][:12]})")
    return info


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and cache; user mistakes print one line and return 2."""
    return inf.run_cli(get_parser(), cache, argv)


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
