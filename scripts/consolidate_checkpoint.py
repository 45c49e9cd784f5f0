"""Consolidate a sharded (FSDP, distributed) checkpoint folder into one .ckpt or .safetensors file.

    python scripts/consolidate_checkpoint.py logs/<run>          # -> logs/<run>/checkpoints/last-full.ckpt
    python scripts/consolidate_checkpoint.py logs/<run>/checkpoints/last.ckpt --out model.safetensors --ema --dtype fp16

A sharded checkpoint (`state_dict_type: sharded` in ldm.training.sharding.FSDPStrategy) is a folder with one
`__<rank>_0.distcp` file per process, `.metadata` and Lightning's `meta.pt`. This reads all shards on one process
(no GPUs and no process group needed; torch.distributed.checkpoint's dcp_to_torch_save) and writes the full weights
under their original names (`model.diffusion_model.*`, `model_ema.*`, `first_stage_model.*`, ...), with
global_step and epoch, so `ldm.util.load_model_from_config` and every script load it. `--ema` puts the EMA weights
in the model's place (as prune_ckpt.py --ema); `--dtype` casts floating-point tensors (.safetensors only);
`--optimizer` keeps the optimizer states too (keyed by parameter name, for inspection, not for resuming).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ldm import inference as inf  # noqa: E402
from ldm.training.config import is_sharded_checkpoint  # noqa: E402
from ldm.util import DTYPE_NAMES, atomic_path, dtype_from_name, ema_state_dict  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    """Input folder (or run), output file, EMA, dtype, optimizer."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("checkpoint", help="a sharded checkpoint folder, or a main.py run (its checkpoints/last.ckpt)")
    add("--out", default=None, help="output .ckpt or .safetensors (default: <folder>-full.ckpt beside it)")
    add("--ema", action="store_true", help="write the EMA weights under the model's parameter names")
    add("--dtype", choices=sorted(DTYPE_NAMES), default=None, help="cast floating-point tensors (.safetensors only)")
    add("--optimizer", action="store_true", help="keep the optimizer states (.ckpt only)")
    return parser


def sharded_folder(path: str) -> str:
    """The sharded checkpoint folder named by `path` (itself, or a run's checkpoints/last.ckpt)."""
    for candidate in (path, os.path.join(path, "checkpoints", "last.ckpt")):
        if is_sharded_checkpoint(candidate):
            return candidate
    raise inf.ScriptError(f"'{path}' is not a sharded checkpoint (a folder with meta.pt and .distcp files) nor a run "
                          "with one as checkpoints/last.ckpt")


def read_sharded(folder: str) -> tuple[dict, dict]:
    """(all shards merged: state_dict and optimizer_<i>, Lightning's meta.pt) of a sharded checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        merged = os.path.join(tmp, "merged.pt")
        dcp_to_torch_save(folder, merged)
        state = torch.load(merged, map_location="cpu", weights_only=True)
    meta = torch.load(os.path.join(folder, "meta.pt"), map_location="cpu", weights_only=True)
    return state, meta


def consolidate(args: argparse.Namespace) -> str:
    """Write the consolidated file; returns its path."""
    folder = sharded_folder(args.checkpoint)
    out = args.out or folder.rstrip("/").removesuffix(".ckpt") + "-full.ckpt"
    if not out.endswith((".ckpt", ".safetensors")):
        raise inf.ScriptError(f"--out: '{out}' must end in .ckpt or .safetensors")
    if args.dtype and not out.endswith(".safetensors") or args.optimizer and out.endswith(".safetensors"):
        raise inf.ScriptError("--dtype goes with a .safetensors --out, --optimizer with a .ckpt one")
    state, meta = read_sharded(folder)
    weights = {k: v for k, v in state["state_dict"].items() if isinstance(v, torch.Tensor)}
    if args.ema:
        weights = {k: v for k, v in ema_state_dict(weights, folder).items() if not k.startswith("model_ema.")}
    if out.endswith(".safetensors"):
        dtype = dtype_from_name(args.dtype, "--dtype", nullable=True)
        weights = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).contiguous().clone()
                   for k, v in weights.items()}
        with atomic_path(out) as tmp:
            save_file(weights, tmp, metadata={"global_step": str(meta.get("global_step")),
                                              "epoch": str(meta.get("epoch")), "source": os.path.basename(folder),
                                              "weights": "ema" if args.ema else "raw"})
    else:
        checkpoint = {"state_dict": weights, "global_step": meta.get("global_step"), "epoch": meta.get("epoch"),
                      "pytorch-lightning_version": meta.get("pytorch-lightning_version")}
        if args.optimizer:
            checkpoint["optimizer_states"] = [state[k] for k in sorted(state) if k.startswith("optimizer_")]
        with atomic_path(out) as tmp:
            torch.save(checkpoint, tmp)
    print(f"{folder}: step {meta.get('global_step')}, {len(weights)} tensors -> {out} "
          f"({os.path.getsize(out) / 2**20:.2f} MiB{', EMA weights' if args.ema else ''})")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and consolidate; user mistakes print one line and return 2."""
    return inf.run_cli(get_parser(), consolidate, argv)


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
