"""Prune a Lightning checkpoint to its weights: a .safetensors file without optimiser state, in fp16, bf16 or fp32.

    python scripts/prune_ckpt.py logs/<run>/checkpoints/last.ckpt --ema             # -> last-ema-fp16.safetensors
    python scripts/prune_ckpt.py model.ckpt --dtype fp32 --out model-raw.safetensors

With --ema the EMA weights (`model_ema.*`) are written under the model's own parameter names (`model.*`), so
`load_model_from_config` and every script load them as the model's weights; without it the raw weights are kept.
The `model_ema.*` entries are left out either way. Floating-point tensors are cast to --dtype, others kept;
global_step and epoch are kept as safetensors metadata. Prints the file sizes before and after.
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
from safetensors.torch import save_file  # noqa: E402

from ldm import inference as inf  # noqa: E402
from ldm.util import DTYPE_NAMES, atomic_path, dtype_from_name, ema_state_dict, read_checkpoint  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    """Input checkpoint, output file, EMA and dtype."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("ckpt", help="a Lightning .ckpt (or a bare state dict / .safetensors)")
    add("--out", default=None, help="output .safetensors (default: <ckpt stem>[-ema]-<dtype>.safetensors beside it)")
    add("--ema", action="store_true", help="keep the EMA weights, under the model's parameter names")
    add("--dtype", choices=sorted(DTYPE_NAMES), default="fp16", help="dtype of the floating-point tensors")
    add("--unsafe-load", dest="unsafe_load", action="store_true",
        help="read the checkpoint with weights_only=False (runs code in the pickle: trusted files only)")
    return parser


def pruned_state_dict(state: dict[str, torch.Tensor], source: str, ema: bool, dtype: torch.dtype) -> dict:
    """The weights to keep: EMA swapped in (when asked), model_ema.* dropped, floats cast, each tensor its own."""
    if ema:
        state = ema_state_dict(state, source)
    out = {}
    for key, value in state.items():
        if key.startswith("model_ema.") or not isinstance(value, torch.Tensor):
            continue
        value = value.to(dtype) if value.is_floating_point() else value
        out[key] = value.detach().contiguous().clone()  # safetensors refuses tensors that share memory
    return out


def size_text(nbytes: int) -> str:
    """Bytes as MiB with two decimals."""
    return f"{nbytes / 2**20:.2f} MiB"


def prune(args: argparse.Namespace) -> str:
    """Write the pruned file; returns its path."""
    out = args.out or str(Path(args.ckpt).with_name(f"{Path(args.ckpt).stem}{'-ema' if args.ema else ''}-"
                                                    f"{args.dtype}.safetensors"))
    if not out.endswith(".safetensors"):
        raise inf.ScriptError(f"--out: '{out}' must end in .safetensors")
    if os.path.abspath(out) == os.path.abspath(args.ckpt):
        raise inf.ScriptError(f"--out: '{out}' is the input checkpoint; choose another file")
    state, meta = read_checkpoint(args.ckpt, weights_only=not args.unsafe_load)
    pruned = pruned_state_dict(state, args.ckpt, args.ema, dtype_from_name(args.dtype))
    metadata = {key: str(value) for key, value in meta.items()}
    metadata.update(source=os.path.basename(args.ckpt), weights="ema" if args.ema else "raw", dtype=args.dtype)
    with atomic_path(out) as tmp:
        save_file(pruned, tmp, metadata=metadata)
    before, after = os.path.getsize(args.ckpt), os.path.getsize(out)
    dropped = len(state) - len(pruned)
    print(f"{args.ckpt}: {size_text(before)} ({len(state)} tensors)")
    print(f"{out}: {size_text(after)} ({len(pruned)} tensors, {dropped} dropped, {args.dtype}"
          f"{', EMA weights' if args.ema else ''})")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and prune; user mistakes print one line and return 2."""
    return inf.run_cli(get_parser(), prune, argv)


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
