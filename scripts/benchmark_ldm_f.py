"""Training and sampling speed of the miniature LDM-f models (configs/latent-diffusion/mnist-ldm-f{1,2,4,8}.yaml),
side by side in one run: the same UNet on 32x32x3 pixels (f = 1) or on the latents of f = 2, 4, 8 autoencoders.

    python scripts/benchmark_ldm_f.py --threads 2                       # train steps/s and DDIM-50 images/s
    python scripts/benchmark_ldm_f.py --factors 4 8 --sample-batch 16 --ddim-steps 20 --repeats 5

For each f it reports the UNet's parameter count, the work of one training step and of one sample counted by
`torch.utils.flop_counter` (independent of the machine's load), the measured training steps/s (the LDM's own
loss, AdamW step and EMA update on MNIST batches of the config's batch size; the frozen encoder included) and
images/s of DDIM sampling with the decoder (batch --sample-batch, --ddim-steps steps, guidance --scale). The
measurements of the different f alternate within every repeat, so a change of load affects them alike; the
medians are printed. Weights are freshly initialised (speed does not depend on them).
"""
from __future__ import annotations

import argparse
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
from torch.utils.data import default_collate  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from ldm.inference import ScriptError, run_cli  # noqa: E402
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

CONFIG = "configs/latent-diffusion/mnist-ldm-f{f}.yaml"


def get_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--factors", type=int, nargs="+", default=[1, 2, 4, 8], help="downsampling factors f to compare")
    add("--config", default=CONFIG, help="config path pattern with {f}")
    add("--train-steps", type=int, default=5, help="timed training steps per repeat (after one warm-up step)")
    add("--sample-batch", type=int, default=64, help="images per DDIM call")
    add("--ddim-steps", type=int, default=50, help="DDIM steps")
    add("--scale", type=float, default=1.0, help="classifier-free guidance scale (1: no guidance)")
    add("--repeats", type=int, default=3, help="alternating rounds over the factors; medians are reported")
    add("--sample-repeats", type=int, default=1, help="rounds that also time sampling (the slow part)")
    add("--threads", type=int, default=2, help="torch intra-op threads")
    add("--seed", type=int, default=0)
    add("overrides", nargs="*", help="OmegaConf dotlist applied to every config, e.g. data.params.batch_size=16")
    return parser


class Subject:
    """One f: its LDM, optimizer and fixed batches."""

    def __init__(self, f: int, path: str, overrides: Sequence[str]) -> None:
        if not Path(path).is_file():
            raise ScriptError(f"--config: {path} (f = {f}) does not exist")
        config = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
        if "params" in config.model.params.first_stage_config:
            config.model.params.first_stage_config.params.ckpt_path = None
        self.f = f
        self.model = instantiate_from_config(config.model, path=f"model ({path})")
        self.model.learning_rate = float(config.model.base_learning_rate) * int(config.data.params.batch_size)
        optimizer = self.model.configure_optimizers()
        self.optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
        dataset = instantiate_from_config(config.data.params.train)
        batch_size = int(config.data.params.batch_size)
        self.batch = default_collate([dataset[i] for i in range(batch_size)])
        self.batch_size = batch_size
        self.unet_params = sum(p.numel() for p in self.model.model.diffusion_model.parameters())
        self.shape = (self.model.channels, self.model.image_size, self.model.image_size)
        self.sampler = DDIMSampler(self.model)
        self.train_rates: list[float] = []
        self.sample_rates: list[float] = []

    def train_step(self) -> None:
        """What main.py does per batch: loss, backward, AdamW step, EMA update."""
        self.model.train()
        loss, _ = self.model.shared_step(dict(self.batch))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.model.on_train_batch_end(None, self.batch, 0)

    @torch.no_grad()
    def sample(self, n: int, steps: int, scale: float) -> torch.Tensor:
        """n class-conditional images (digits 0..9 repeated) by DDIM, decoded to pixels."""
        self.model.eval()
        labels = {"class_label": torch.arange(n) % 10}
        c = self.model.get_learned_conditioning(labels)
        uc = None
        if scale != 1.0:
            uc = self.model.get_learned_conditioning(self.model.get_unconditional_conditioning(n))
        latents, _ = self.sampler.sample(S=steps, conditioning=c, batch_size=n, shape=self.shape, eta=0.0,
                                         verbose=False, unconditional_guidance_scale=scale,
                                         unconditional_conditioning=uc)
        return self.model.decode_first_stage(latents)

    def sample_gflop(self, steps: int, scale: float) -> float:
        """Counted work of one image: `steps` denoiser calls (two with guidance) and one decode."""
        one_step = counted_gflop(lambda: self.sample(1, 1, scale))
        decode = counted_gflop(lambda: self.model.decode_first_stage(torch.zeros(1, *self.shape)))
        return (one_step - decode) * steps + decode


def timed(fn: Callable[[], Any], repeat: int = 1) -> float:
    """Seconds per call of fn, over `repeat` calls."""
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def counted_gflop(fn: Callable[[], Any]) -> float:
    """GFLOP of one call of fn (matrix products and convolutions, as torch.utils.flop_counter counts them)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 1e9


def body(args: argparse.Namespace) -> None:
    """Build every f, count, time alternately, print the table."""
    for flag in ("train_steps", "sample_batch", "ddim_steps", "repeats", "threads"):
        if getattr(args, flag) < 1:
            raise ScriptError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    subjects = [Subject(f, args.config.format(f=f), args.overrides) for f in args.factors]
    steps, n = args.ddim_steps, args.sample_batch
    for s in subjects:
        s.train_gflop = counted_gflop(s.train_step)
        s.gflop_per_sample = s.sample_gflop(steps, args.scale)
    for round_ in range(args.repeats):
        for s in subjects:
            s.train_step()  # warm-up
            s.train_rates.append(1.0 / timed(s.train_step, args.train_steps))
            if round_ < args.sample_repeats:
                s.sample_rates.append(n / timed(lambda: s.sample(n, steps, args.scale)))
        print(f"round {round_ + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    print_table(subjects, args)


def print_table(subjects: Sequence[Subject], args: argparse.Namespace) -> None:
    """One row per f, speeds relative to the first factor."""
    print(f"torch {torch.__version__}, {args.threads} thread(s); medians of {args.repeats} round(s) "
          f"({args.train_steps} training steps each) and {min(args.sample_repeats, args.repeats)} sampling round(s)")
    print(f"sampling: DDIM {args.ddim_steps} steps, batch {args.sample_batch}, guidance scale {args.scale:g}, "
          "decoder included")
    head = (f"{'f':>2} {'latent':>9} {'UNet params':>12} {'GFLOP/train step':>17} {'train steps/s':>14} "
            f"{'GFLOP/sample':>13} {'images/s':>9} {'train x':>8} {'sample x':>9}")
    print(head)
    base_train = statistics.median(subjects[0].train_rates)
    base_sample = statistics.median(subjects[0].sample_rates)
    for s in subjects:
        train, sample = statistics.median(s.train_rates), statistics.median(s.sample_rates)
        latent = "x".join(str(d) for d in s.shape)
        print(f"{s.f:>2} {latent:>9} {s.unet_params:>12,} {s.train_gflop:>17.1f} {train:>14.3f} "
              f"{s.gflop_per_sample:>13.2f} {sample:>9.2f} {train / base_train:>8.1f} {sample / base_sample:>9.1f}")
    print(f"(batch {subjects[0].batch_size} per training step; 'x' columns: speed relative to f = {subjects[0].f})")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one `error: ...` line and exit status 2 for a user mistake."""
    return run_cli(get_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())
