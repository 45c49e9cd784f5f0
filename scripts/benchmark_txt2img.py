"""End-to-end SD v1 txt2img against diffusers' StableDiffusionPipeline: wall time and peak memory, each with its defaults.

Both frameworks get the same random weights (the full SD v1 model of configs/stable-diffusion/v1-inference.yaml, its
CLIP ViT-L/14 text encoder with random weights and the CLIP tokenizer written locally by
`ldm.modules.encoders.frozen.write_clip_tokenizer`), written once to a checkpoint. Each run is its own process:
- ours: `scripts/txt2img.py --config ... --ckpt ... --ddim_steps 50 --scale 7.5 --n_samples 1 --n_iter 1` (its
  defaults otherwise: fp32 on CPU, compiling the UNet when that pays for itself within the run);
- diffusers: StableDiffusionPipeline built from the same weights (models made on the meta device and loaded with
  assign, as from_pretrained does), DDIMScheduler with SD v1's settings, 50 steps, guidance 7.5, its defaults
  otherwise.
Wall time counts from the process's first line of work to the image (loading, text encoding, sampling, decoding,
compiling); peak memory is the process's peak RSS (VmHWM). Runs alternate (`--repeats`).

    python scripts/benchmark_txt2img.py --repeats 1            # 512x512, 50 DDIM steps: long on a CPU
    python scripts/benchmark_txt2img.py --tiny --steps 2       # a tiny SD-like model (the test)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

SD_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"
PROMPT = "a painting of a virus monster playing guitar"
CLIP_L14 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
TINY_CLIP = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
TINY = {"unet_config": {"params": {"model_channels": 32, "channel_mult": [1, 2], "attention_resolutions": [1],
                                   "num_res_blocks": 1, "num_heads": 2, "context_dim": 32}},
        "first_stage_config": {"params": {"ddconfig": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1}}}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--size", type=int, default=512, help="image height and width")
    add("--steps", type=int, default=50, help="DDIM steps")
    add("--scale", type=float, default=7.5, help="guidance scale")
    add("--repeats", type=int, default=1, help="runs of each framework, alternating")
    add("--extrapolate", type=int, default=50, help="also estimate a run of this many steps: the measured fixed "
                                                     "costs plus this many times the measured time per step")
    add("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (default: the environment's)")
    add("--tiny", action="store_true", help="a tiny SD-like model (checks the script)")
    add("--workdir", type=Path, default=None, help="where the weights go (default: a temporary directory)")
    add("--ours-args", default="", help="extra txt2img.py flags, e.g. '--no-compile'")
    add("--frameworks", nargs="+", choices=("ours", "diffusers"), default=["ours", "diffusers"],
        help="which frameworks to run (the ratios need both)")
    add("--worker", choices=("prepare", "ours", "diffusers"), default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def prepare(workdir: Path, tiny: bool) -> tuple[Path, Path, Path]:
    """(config, checkpoint, CLIP folder) of a random-weight SD v1 model written under workdir."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.modules.encoders.frozen import write_clip_tokenizer
    from ldm.util import instantiate_from_config

    clip_dir = write_clip_tokenizer(workdir / "clip")
    torch.manual_seed(0)
    text = CLIPTextConfig(**(TINY_CLIP if tiny else CLIP_L14), vocab_size=49408, max_position_embeddings=77,
                          projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    CLIPTextModel(text).save_pretrained(clip_dir)
    config = OmegaConf.load(SD_CONFIG)
    if tiny:
        config.model.params = OmegaConf.merge(config.model.params, TINY)
    config.model.params.cond_stage_config.params = {**(config.model.params.cond_stage_config.get("params") or {}),
                                                    "version": str(clip_dir)}
    model = instantiate_from_config(config.model)
    ckpt, config_path = workdir / "model.ckpt", workdir / "config.yaml"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    OmegaConf.save(config, config_path)
    return config_path, ckpt, clip_dir


def now() -> tuple[float, float]:
    """(wall clock, this process's CPU time): on a shared machine the CPU time is the steadier measure of the work
    (preemption by other processes does not count)."""
    return time.perf_counter(), time.process_time()


class Phases:
    """Wall and CPU time inside the text encoder, the UNet (first call's start to last call's end) and the decoder,
    timed by forward hooks on the modules each framework runs."""

    def __init__(self) -> None:
        self.seconds = {"text_encode": [0.0, 0.0], "decode": [0.0, 0.0]}
        self.first_call: tuple[float, float] | None = None
        self.unet_calls = 0
        self.unet_first: tuple[float, float] | None = None
        self.unet_first_end: tuple[float, float] | None = None
        self.unet_last: tuple[float, float] | None = None
        self._started: dict[str, tuple[float, float]] = {}
        self.rss_before_decode = float("nan")

    def watch(self, text_encoder: torch.nn.Module, unet: torch.nn.Module, decoder: torch.nn.Module) -> None:
        """Put the hooks on one framework's three modules."""
        for name, module in (("text_encode", text_encoder), ("decode", decoder), ("unet", unet)):
            module.register_forward_pre_hook(lambda *_, n=name: self._start(n))
            module.register_forward_hook(lambda *_, n=name: self._end(n))

    def _start(self, name: str) -> None:
        stamp = now()
        if name == "decode":
            self.rss_before_decode = rss_gib("VmRSS")
        self.first_call = self.first_call or stamp
        if name == "unet":
            self.unet_first = self.unet_first or stamp
        self._started[name] = stamp

    def _end(self, name: str) -> None:
        stamp = now()
        if name == "unet":
            self.unet_calls, self.unet_last = self.unet_calls + 1, stamp
            self.unet_first_end = self.unet_first_end or stamp
        else:
            for clock in (0, 1):
                self.seconds[name][clock] += stamp[clock] - self._started[name][clock]

    def result(self, start: tuple[float, float], end: tuple[float, float], steps: int) -> dict[str, float]:
        """Seconds of setup (loading and building, until the first watched call), text encoding, sampling (all UNet
        calls and the sampler between them), the first step (compiling, when the UNet is compiled) and each later
        one, decoding, and the rest (image conversion, saving); wall clock, and CPU time under the same names with
        a `cpu_` prefix. With guidance each step is one UNet call on the doubled batch in both frameworks."""
        out: dict[str, float] = {"unet_calls": self.unet_calls, "rss_before_decode_gib": self.rss_before_decode}
        for clock, prefix in ((0, ""), (1, "cpu_")):
            setup = (self.first_call or end)[clock] - start[clock]
            sampling = (self.unet_last or end)[clock] - (self.unet_first or end)[clock]
            text, decode = self.seconds["text_encode"][clock], self.seconds["decode"][clock]
            total = end[clock] - start[clock]
            first = (self.unet_first_end or end)[clock] - (self.unet_first or end)[clock]
            later = (sampling - first) / (steps - 1) if steps > 1 else first
            out.update({f"{prefix}seconds": total, f"{prefix}setup": setup, f"{prefix}text_encode": text,
                        f"{prefix}sampling": sampling, f"{prefix}first_step": first, f"{prefix}per_step": later,
                        f"{prefix}decode": decode, f"{prefix}rest": total - setup - sampling - text - decode})
        return out


def run_ours(args: argparse.Namespace, config: Path, ckpt: Path, workdir: Path, phases: Phases) -> None:
    """scripts/txt2img.py with its defaults for one image."""
    sys.path.insert(0, str(REPO / "scripts"))
    import txt2img

    load = txt2img.inf.load_from_args

    def load_and_watch(flags: argparse.Namespace) -> tuple:
        model, device, path = load(flags)
        phases.watch(model.cond_stage_model, model.model.diffusion_model, model.first_stage_model.decoder)
        return model, device, path

    txt2img.inf.load_from_args = load_and_watch

    argv = ["--config", str(config), "--ckpt", str(ckpt), "--prompt", PROMPT, "--H", str(args.size), "--W",
            str(args.size), "--ddim_steps", str(args.steps), "--scale", str(args.scale), "--n_samples", "1",
            "--n_iter", "1", "--outdir", str(workdir / "ours"), *args.ours_args.split()]
    if txt2img.main(argv) != 0:
        raise SystemExit("txt2img.py failed")


def run_diffusers(args: argparse.Namespace, config: Path, ckpt: Path, clip_dir: Path, workdir: Path,
                  phases: Phases) -> None:
    """StableDiffusionPipeline over the same weights, one image."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ldm.convert.diffusers_unet import diffusers_unet_config, unet_state_dict_to_diffusers
    from ldm.convert.diffusers_vae import diffusers_vae_config, vae_state_dict_to_diffusers
    from ldm.util import read_checkpoint

    p = OmegaConf.load(config).model.params
    sd = read_checkpoint(str(ckpt), mmap=True)[0]  # mapped, as ours and as from_pretrained reads safetensors

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    unet_params = OmegaConf.to_container(p.unet_config.params)
    first = p.first_stage_config.params
    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_unet_config(unet_params))
        vae = AutoencoderKL(**diffusers_vae_config(OmegaConf.to_container(first.ddconfig), first.embed_dim),
                            scaling_factor=float(p.scale_factor))
    unet.load_state_dict(unet_state_dict_to_diffusers(part("model.diffusion_model."), unet_params), assign=True)
    vae.load_state_dict(vae_state_dict_to_diffusers(part("first_stage_model.")), assign=True)
    del sd
    scheduler = DDIMScheduler(beta_start=float(p.linear_start), beta_end=float(p.linear_end),
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=CLIPTextModel.from_pretrained(clip_dir).eval(),
                                   tokenizer=CLIPTokenizer.from_pretrained(clip_dir), unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    phases.watch(pipe.text_encoder, pipe.unet, pipe.vae.decoder)
    image = pipe(PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps,
                 guidance_scale=args.scale, generator=torch.Generator().manual_seed(42)).images[0]
    (workdir / "diffusers").mkdir(exist_ok=True)
    image.save(workdir / "diffusers" / "00000.png")


def worker(args: argparse.Namespace) -> None:
    """One framework's run in this process; prints {"seconds", "peak_rss_gib", the phases} as JSON on the last line."""
    workdir = args.workdir
    config, ckpt, clip_dir = workdir / "config.yaml", workdir / "model.ckpt", workdir / "clip"
    if args.worker == "prepare":  # its own process, so that the runs' parent does not hold the built model
        prepare(workdir, args.tiny)
        print(json.dumps({}))
        return
    phases = Phases()
    start = now()
    if args.worker == "ours":
        run_ours(args, config, ckpt, workdir, phases)
    else:
        run_diffusers(args, config, ckpt, clip_dir, workdir, phases)
    end = now()
    print(json.dumps({"peak_rss_gib": peak_rss_gib(), **phases.result(start, end, args.steps)}))


def rss_gib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS now, VmHWM its peak), in GiB; NaN elsewhere."""
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field + ":"))
        return int(line.split()[1]) / 2**20  # kB
    except (OSError, StopIteration):
        return float("nan")


def peak_rss_gib() -> float:
    """This process's peak resident memory: VmHWM of /proc/self/status (its own address space only; getrusage's
    ru_maxrss keeps the parent's size from before exec), else getrusage."""
    peak = rss_gib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 if math.isnan(peak) else peak


def spawn(args: argparse.Namespace, framework: str, workdir: Path) -> dict[str, float]:
    """A worker process for one framework; its JSON result."""
    command = [sys.executable, __file__, "--worker", framework, "--workdir", str(workdir), "--size", str(args.size),
               "--steps", str(args.steps), "--scale", str(args.scale), f"--ours-args={args.ours_args}",
               *(["--tiny"] if args.tiny else [])]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{framework} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


PHASES = ("setup", "text_encode", "sampling", "first_step", "per_step", "decode", "rest")


def compare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Prepare the weights (kept in a --workdir that has them), run both frameworks alternately, print the table;
    returns the medians."""
    if not ((workdir / "model.ckpt").is_file() and (workdir / "config.yaml").is_file()):
        spawn(args, "prepare", workdir)
    runs: dict[str, list[dict[str, float]]] = {fw: [] for fw in args.frameworks}
    for _ in range(args.repeats):
        for framework in runs:
            runs[framework].append(spawn(args, framework, workdir))
            print(f"  {framework}: {runs[framework][-1]}", file=sys.stderr, flush=True)
    keys = [key for key in runs["ours"][0] if key != "unet_calls"]
    result = {fw: {key: statistics.median(r[key] for r in rs) for key in keys} for fw, rs in runs.items()}
    for r in result.values():  # the same run with --extrapolate steps: the fixed costs plus that many steps
        for prefix in ("", "cpu_"):
            r[f"{prefix}estimate"] = (r[f"{prefix}seconds"] - r[f"{prefix}sampling"] + r[f"{prefix}first_step"]
                                      + (args.extrapolate - 1) * r[f"{prefix}per_step"])
    load = os.getloadavg()
    print(f"{'tiny SD-like' if args.tiny else 'SD v1'} txt2img {args.size}x{args.size}, {args.steps} DDIM steps, "
          f"scale {args.scale}, 1 image; torch {torch.__version__}; load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f}; median of {args.repeats}")
    print(f"| framework | clock | total s | setup s | text encode s | sampling s | first step s | later steps s "
          f"| decode s | rest s | {args.extrapolate} steps est. s | peak RSS GiB |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")
    for fw, r in result.items():
        for prefix, clock in (("", "wall"), ("cpu_", "CPU")):
            print(f"| {fw} | {clock} | {r[prefix + 'seconds']:.1f} | "
                  + " | ".join(f"{r[prefix + k]:.2f}" for k in PHASES)
                  + f" | {r[prefix + 'estimate']:.1f} | {r['peak_rss_gib']:.3f} |")
    if len(result) < 2:
        return result
    ours, theirs = result["ours"], result["diffusers"]
    for prefix, clock in (("", "wall"), ("cpu_", "CPU")):
        ratio = {k: ours[prefix + k] / theirs[prefix + k] if theirs[prefix + k] else float("nan")
                 for k in ("seconds", "per_step", "estimate", "setup", "decode")}
        print(f"ours / diffusers ({clock}): total {ratio['seconds']:.2f}, per step {ratio['per_step']:.2f}, setup "
              f"{ratio['setup']:.2f}, decode {ratio['decode']:.2f}, {args.extrapolate}-step estimate "
              f"{ratio['estimate']:.2f}")
    print(f"ours / diffusers: peak memory {ours['peak_rss_gib'] / theirs['peak_rss_gib']:.3f}; resident when "
          f"decoding starts {ours['rss_before_decode_gib']:.3f} vs {theirs['rss_before_decode_gib']:.3f} GiB")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """The comparison, or one worker run (internal)."""
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return None
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return compare(args, args.workdir)
    with tempfile.TemporaryDirectory() as tmp:
        return compare(args, Path(tmp))


if __name__ == "__main__":
    main()
