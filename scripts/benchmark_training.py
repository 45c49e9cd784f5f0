"""Training steps/s of a LatentDiffusion config: main.py (Lightning) vs a bare PyTorch loop vs a diffusers loop.

All three train the same model from the same config on the same data loader (batch size, workers) with the same
optimiser (AdamW at the config's learning rate, torch's fused kernel where it applies) and an EMA of the weights:

- `main.py`: `python main.py -b <config> -t --max_steps N` in a subprocess, timed by `ldm.training.throughput.StepTimer`
  (wall clock at the end of every step; start-up, the first `--skip` steps and the final checkpoint are not counted);
- `bare`: the same LatentDiffusion module in a plain loop: `shared_step` (first-stage encoding without gradients, the
  conditioning, the loss), `zero_grad(set_to_none=True)`, `backward`, `step`, the EMA update;
- `diffusers`: UNet2DConditionModel and AutoencoderKL holding the same weights (converted by `ldm.convert`), the same
  text encoder module, DDPMScheduler (same betas and parameterization) for noise and target, diffusers' EMAModel
  (foreach), `F.mse_loss` — the diffusers train_text_to_image recipe at the same size.

Loops alternate (`--repeats` rounds of main.py, bare, diffusers), so a shared machine's load hits them alike; the
table gives the median steps/s of each, by the wall clock and per CPU second of the training process (steadier on
a shared machine: other processes' load does not count, the data workers' time neither), and the CPU ratio to the
bare loop. `--variant NAME:key=value,...` adds main.py
runs with config overrides (e.g. `nobar:lightning.trainer.enable_progress_bar=false`) to measure one setting.

    python scripts/benchmark_training.py --steps 60 --repeats 2 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from ldm.training.config import load_config  # noqa: E402
from ldm.training.throughput import steps_per_second  # noqa: E402
from ldm.util import fused_adam_kwargs, instantiate_from_config  # noqa: E402

DEFAULT_CONFIG = "configs/latent-diffusion/shapes-ldm-kl-4.yaml"
PARAMETERIZATIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
LOOPS = ("main", "bare", "diffusers")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--config", default=DEFAULT_CONFIG, help="a LatentDiffusion config with a data section")
    add("--steps", type=int, default=60, help="optimisation steps per measurement")
    add("--skip", type=int, default=10, help="warm-up steps left out of the rate")
    add("--repeats", type=int, default=2, help="rounds of every loop")
    add("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS for main.py)")
    add("--loops", nargs="+", choices=LOOPS, default=list(LOOPS), help="which loops to time")
    add("--variant", action="append", default=[], metavar="NAME:key=value,...",
        help="an extra main.py run with these config overrides (repeatable)")
    add("--seed", type=int, default=23, help="seed of every loop (main.py's default)")
    add("overrides", nargs="*", help="key=value config overrides for every loop (e.g. data.params.batch_size=16)")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------- shared set-up
def benchmark_config(config_path: str, overrides: list[str]) -> DictConfig:
    """The merged config, as main.py merges it."""
    config, _ = load_config([config_path], list(overrides))
    return config


def build_model(config: DictConfig) -> Any:
    """The LatentDiffusion module of the config, its learning rate scaled as main.py scales it on one device."""
    model = instantiate_from_config(config.model)
    model.learning_rate = config.data.params.batch_size * config.model.base_learning_rate
    return model.train()


def train_loader(config: DictConfig) -> Any:
    """The config's training DataLoader (DataModuleFromConfig, as main.py builds it)."""
    data = instantiate_from_config(config.data)
    data.prepare_data()
    data.setup("fit")
    return data.train_dataloader()


def adamw(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The optimiser of every loop: DDPM.configure_optimizers' AdamW."""
    return torch.optim.AdamW(params, lr=lr, **fused_adam_kwargs(params))


Rate = tuple[float, float]  # (steps per wall-clock second, steps per CPU second of the training process)


def rates(times: list[float], cpu_times: list[float], skip: int) -> Rate:
    """(wall, CPU) steps/s after `skip` warm-up steps."""
    return steps_per_second(times, skip), steps_per_second(cpu_times, skip)


def time_loop(step: Callable[[dict], None], loader: Iterable, steps: int, skip: int) -> Rate:
    """(wall, CPU) steps/s of `step` over batches of `loader` after `skip` warm-up steps."""
    times, cpu_times = [], []
    for batch, _ in zip(loader, range(steps)):
        step(batch)
        times.append(time.perf_counter())
        cpu_times.append(time.process_time())
    return rates(times, cpu_times, skip)


# ----------------------------------------------------------------------------------------- the loops
def bare_loop(config: DictConfig, args: argparse.Namespace) -> Rate:
    """The LatentDiffusion module trained in a plain PyTorch loop."""
    torch.manual_seed(args.seed)
    model = build_model(config)
    params = model.trainable_parameters()
    opt = adamw(params, model.learning_rate)

    def step(batch: dict) -> None:
        model._apply_ucg_training(batch)
        loss, _ = model.shared_step(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if model.use_ema:
            model.model_ema(model.model)

    return time_loop(step, train_loader(config), args.steps, args.skip)


def diffusers_models(config: DictConfig, model: Any) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """diffusers' UNet and AutoencoderKL holding `model`'s weights, and its DDPMScheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from ldm.convert.diffusers_unet import diffusers_unet_config, unet_state_dict_to_diffusers
    from ldm.convert.diffusers_vae import diffusers_vae_config, vae_state_dict_to_diffusers

    p = config.model.params
    unet_params = OmegaConf.to_container(p.unet_config.params, resolve=True)
    unet = UNet2DConditionModel(**diffusers_unet_config(unet_params))
    unet.load_state_dict(unet_state_dict_to_diffusers(model.model.diffusion_model.state_dict(), unet_params))
    first = p.first_stage_config.params
    vae = AutoencoderKL(**diffusers_vae_config(OmegaConf.to_container(first.ddconfig), first.embed_dim))
    vae.load_state_dict(vae_state_dict_to_diffusers(model.first_stage_model.state_dict()))
    scheduler = DDPMScheduler(num_train_timesteps=p.get("timesteps", 1000), beta_start=p.get("linear_start", 1e-4),
                              beta_end=p.get("linear_end", 2e-2), beta_schedule="scaled_linear",
                              prediction_type=PARAMETERIZATIONS[p.get("parameterization", "eps")])
    return unet.train(), vae.eval().requires_grad_(False), scheduler


def diffusers_loop(config: DictConfig, args: argparse.Namespace) -> Rate:
    """diffusers' train_text_to_image step at the same size: VAE latents, text encoder, UNet, EMAModel."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(args.seed)
    model = build_model(config)
    unet, vae, scheduler = diffusers_models(config, model)
    text = model.cond_stage_model
    p = config.model.params
    scale = float(p.get("scale_factor", 1.0))
    ucg = {key: (spec["p"], spec.get("val") or "") for key, spec in (p.get("ucg_training") or {}).items()}
    params = list(unet.parameters()) + ([q for q in text.parameters() if q.requires_grad]
                                        if p.get("cond_stage_trainable", False) else [])
    opt = adamw(params, model.learning_rate)
    ema = EMAModel(params, decay=0.9999, foreach=True)
    rng = np.random.RandomState()
    key, caption_key = p.get("first_stage_key", "image"), p.get("cond_stage_key", "caption")

    def step(batch: dict) -> None:
        captions = list(batch[caption_key])
        if caption_key in ucg:
            drop, null = ucg[caption_key]
            captions = [null if rng.random() < drop else c for c in captions]
        pixels = batch[key].permute(0, 3, 1, 2).float()
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * scale
        context = text(captions)
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = scheduler.add_noise(latents, noise, t)
        target = scheduler.get_velocity(latents, noise, t) if scheduler.config.prediction_type == "v_prediction" \
            else noise
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample.float(), target.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.step(params)

    return time_loop(step, train_loader(config), args.steps, args.skip)


def main_loop(args: argparse.Namespace, overrides: list[str], workdir: Path) -> Rate:
    """main.py -t in a subprocess, its steps timed by StepTimer."""
    timer = workdir / f"steps-{time.monotonic_ns()}.json"
    extra = workdir / "timer.yaml"
    OmegaConf.save(OmegaConf.create({"lightning": {
        "trainer": {"max_time": None},
        "callbacks": {"step_timer": {"target": "ldm.training.throughput.StepTimer",
                                     "params": {"path": str(timer), "skip": args.skip}}}}}), extra)
    command = [sys.executable, str(REPO / "main.py"), "-b", args.config, str(extra), "-t", "--no-test",
               "-l", str(workdir / "logs"), "--max_steps", str(args.steps), "-s", str(args.seed), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"main.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    record = json.loads(timer.read_text())
    print(f"  main.py first step (compiling, if --compile): {record['times'][0] - record['start']:.1f} s",
          file=sys.stderr, flush=True)
    return rates(record["times"], record["cpu_times"], args.skip)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'NAME:key=value,key=value' -> ('main.py NAME', [key=value, ...])."""
    name, _, overrides = text.partition(":")
    if not name or not overrides:
        raise SystemExit(f"--variant {text!r}: expected NAME:key=value[,key=value...]")
    return f"main.py {name}", overrides.split(",")


def main(argv: list[str] | None = None) -> dict[str, Rate]:
    """Run the loops alternately and print the table; returns the median (wall, CPU) steps/s of each."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = benchmark_config(args.config, args.overrides)
    runs: dict[str, Callable[[Path], Rate]] = {}
    if "main" in args.loops:
        runs["main.py"] = lambda work: main_loop(args, args.overrides, work)
    for variant in args.variant:
        name, overrides = parse_variant(variant)
        runs[name] = lambda work, o=overrides: main_loop(args, [*args.overrides, *o], work)
    if "bare" in args.loops:
        runs["bare loop"] = lambda work: bare_loop(config, args)
    if "diffusers" in args.loops:
        runs["diffusers loop"] = lambda work: diffusers_loop(config, args)
    measured: dict[str, list[Rate]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, run in runs.items():
                measured[name].append(run(Path(tmp)))
                wall, cpu = measured[name][-1]
                print(f"  {name}: {wall:.3f} steps/s wall, {cpu:.3f} per CPU second", file=sys.stderr, flush=True)
    medians = {name: (statistics.median(w for w, _ in values), statistics.median(c for _, c in values))
               for name, values in measured.items()}
    load = os.getloadavg()
    print(f"config {args.config} {' '.join(args.overrides)}; batch {config.data.params.batch_size}, "
          f"{config.data.params.get('num_workers')} loader workers; {args.steps} steps, {args.skip} warm-up; "
          f"{args.threads} thread(s); torch {torch.__version__}, python {platform.python_version()}; "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print("| loop | steps/s wall (median) | steps per CPU s (median) | runs (wall / CPU) | CPU vs bare loop |")
    print("|---|---|---|---|---|")
    base = medians.get("bare loop")
    for name, (wall, cpu) in medians.items():
        ratio = f"{cpu / base[1]:.2f}" if base else "-"
        runs_text = ", ".join(f"{w:.2f}/{c:.2f}" for w, c in measured[name])
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {runs_text} | {ratio} |")
    return medians


if __name__ == "__main__":
    main()
