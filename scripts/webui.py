"""A web interface (gradio) for the trained models: text-to-image, image-to-image, inpainting with a painted mask and
super-resolution, each on the same code as its script (`ldm.pipelines`).

    python scripts/webui.py -r logs/<run>                              # http://127.0.0.1:7860
    python scripts/webui.py -r logs/<run a> -r logs/<run b> --port 8000  # several models, chosen in the page
    python scripts/webui.py --config configs/<model>.yaml --ckpt model.ckpt --host 0.0.0.0

The page shows a tab for each task the loaded model supports; one model is loaded at a time (loading another
releases it), one job runs at a time and the others wait in a queue. Results go to <outdir>/<task>/NNNNN.png with
the PNG metadata the scripts write. The server listens on --host (default 127.0.0.1, this machine only) and never
opens a public share link.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ldm import inference as inf  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    """The model flags of the sampling scripts (-r may be repeated), where results go, host and port."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], conflict_handler="resolve")
    inf.add_model_flags(parser)
    add = parser.add_argument
    add("-r", "--resume", action="append", default=[], metavar="LOGDIR",
        help="a main.py run logs/<run> (or a checkpoint inside it); repeat to offer several models")
    add("--outdir", default="outputs/webui", help="where results are written (<outdir>/<task>/NNNNN.png)")
    add("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface of this machine)")
    add("--port", type=int, default=7860, help="port to listen on")
    return parser


def model_specs(args: argparse.Namespace) -> list:
    """The models offered: --config/--ckpt first (when given), then every -r."""
    from ldm.webui import ModelSpec

    specs = [ModelSpec(args.ckpt, args.config)] if args.ckpt else []
    if args.config and not args.ckpt:
        raise inf.ScriptError("--config needs --ckpt (the checkpoint it describes)")
    specs += [ModelSpec(path) for path in args.resume]
    if not specs:
        raise inf.ScriptError("no model given: pass -r logs/<run> (or --config and --ckpt)")
    return specs


def serve(args: argparse.Namespace, block: bool = True) -> object:
    """Load the first model, build the page and serve it; returns the WebUI (still serving unless `block`)."""
    from ldm.webui import ModelSlot, WebUI

    specs = model_specs(args)
    slot = ModelSlot(inf.pick_device(args.device), use_ema=args.ema)
    slot.load(specs[0])
    ui = WebUI(slot, specs, args.outdir, precision=args.precision)
    print(f"ldm web UI on http://{args.host}:{args.port} (model {specs[0].path}); Ctrl-C stops it", flush=True)
    ui.launch(args.host, args.port, block=block)
    return ui


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and serve; user mistakes (a missing run, a bad checkpoint) print one line and return 2."""
    return inf.run_cli(get_parser(), serve, argv)


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
