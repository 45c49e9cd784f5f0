"""Per-step training cost of shapes demo designs, side by side, to turn a quiet machine's measured steps/s of one
design into the steps another would do in the same minutes.

    OMP_NUM_THREADS=1 python scripts/benchmark_demo.py configs/latent-diffusion/shapes-ldm-kl-4.yaml \
        configs/latent-diffusion/shapes-ldm-kl-2.yaml
    python scripts/benchmark_demo.py configs/autoencoder/shapes-kl-f4.yaml configs/autoencoder/shapes-kl-f2.yaml
    python scripts/benchmark_demo.py A.yaml "A.yaml@data.params.batch_size=64,model.params.unet_config.params.model_channels=32"

Each case is a config (an autoencoder or a latent diffusion model, random weights) with optional dotlist overrides
after '@'. The cases take turns, one optimisation step each, so that the load of a shared machine falls on all of
them alike; the table gives the median milliseconds per step and the ratio to the first case. A step is what the
model's training_step does under main.py, less Lightning's bookkeeping: for an autoencoder the reconstruction loss,
backward and Adam step, then the discriminator's loss, backward and step, then the EMA update; for an LDM caption
dropout, the first-stage encoding, the loss, backward, AdamW step and EMA update. Batches come from the config's own
training data and are built outside the timed region (main.py builds them in a worker process).
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from ldm.models.autoencoder import AutoencoderKL  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    """Cases, steps and threads."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cases", nargs="+", help="CONFIG or CONFIG@key=value,key=value")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per case first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    return parser


def load_case(case: str) -> Any:
    """The config of one case: the file, merged with the dotlist after '@'."""
    path, _, dotlist = case.partition("@")
    if not Path(path).is_file():
        raise SystemExit(f"error: config {path} does not exist")
    overrides = [item for item in re.split(r",(?=[\w.]+=)", dotlist) if item]  # commas inside [..] stay
    return OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(overrides))


def autoencoder_step(model: AutoencoderKL) -> Callable[[dict], None]:
    """One generator and one discriminator update, as AutoencoderKL.training_step does, and the EMA update."""
    opt_ae, opt_disc = model.configure_optimizers()[:2]

    def step(batch: dict) -> None:
        x = model.get_input(batch, model.image_key)
        xrec, aux = model._reconstruct(x)
        loss, _ = model._compute_loss(x, xrec, aux, 0, 0, "train")
        loss.backward()
        opt_ae.step()
        opt_ae.zero_grad(set_to_none=True)
        disc_loss, _ = model._compute_loss(x, xrec.detach(), aux, 1, 0, "train")
        disc_loss.backward()
        opt_disc.step()
        opt_disc.zero_grad(set_to_none=True)
        if model.use_ema:
            model.model_ema(model)

    return step


def diffusion_step(model: Any) -> Callable[[dict], None]:
    """Caption dropout, the loss on the encoded batch, one AdamW update and the EMA update."""
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt

    def step(batch: dict) -> None:
        model._apply_ucg_training(batch)
        loss, _ = model.shared_step(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if model.use_ema:
            model.model_ema(model.model)

    return step


def build(config: Any) -> tuple[Callable[[dict], None], Any]:
    """(step function, endless batch iterator) for one case."""
    model = instantiate_from_config(config.model, path="model")
    model.learning_rate = float(config.model.base_learning_rate) * int(config.data.params.batch_size)
    model.train()
    step = autoencoder_step(model) if isinstance(model, AutoencoderKL) else diffusion_step(model)
    dataset = instantiate_from_config(config.data.params.train, path="data.params.train")
    loader = DataLoader(dataset, batch_size=int(config.data.params.batch_size), shuffle=True, num_workers=0)

    def batches():
        while True:
            yield from loader

    return step, batches()


def main(argv: Sequence[str] | None = None) -> int:
    """Time the cases in turn and print the table."""
    args = get_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = [(case, *build(load_case(case))) for case in args.cases]
    times: dict[str, list[float]] = {case: [] for case, _, _ in cases}
    for i in range(args.warmup + args.steps):
        for case, step, batches in cases:
            batch = next(batches)
            start = time.perf_counter()
            step(batch)
            if i >= args.warmup:
                times[case].append(time.perf_counter() - start)
    base = statistics.median(times[args.cases[0]])
    print(f"{args.steps} steps per case, taken in turn, {args.threads} thread(s)")
    print(f"{'ms/step':>9} {'ratio':>6}  case")
    for case in args.cases:
        median = statistics.median(times[case])
        print(f"{1000 * median:9.1f} {median / base:6.2f}  {case}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
