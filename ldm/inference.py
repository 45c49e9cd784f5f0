"""What the sampling scripts share: finding and loading a model, device and precision, seeds, conditioning,
reading images and writing PNGs (with text metadata) atomically, and one-line errors for user mistakes.

A model is named by `--config` + `--ckpt` (as in the original scripts) or by a main.py run: `-r/--resume
logs/<run>` (or a checkpoint inside it, or `--ckpt` pointing at either) takes the run's merged
`configs/*.yaml` and `checkpoints/last.ckpt`.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import os
import random
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image, PngImagePlugin, UnidentifiedImageError
from tqdm import trange

from ldm.acceleration import compile_pays, compile_unet, store_for_autocast, unet_of, warn_if_emulated_bf16
from ldm.errors import UserError
from ldm.training.config import load_config
from ldm.util import atomic_path, load_model_from_config, reuse_freed_memory

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("autocast", "full", "bf16")


class ScriptError(UserError):
    """A user mistake in a script's flags or inputs; printed as one line `error: ...`, exit status 2."""


# what run_cli and the web UI catch: every user mistake derives from ldm.errors.UserError
USER_ERRORS = (UserError,)


def run_cli(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], Any],
            argv: Sequence[str] | None = None) -> int:
    """Parse argv and run a script's body: 0 on success; a user error prints one line on stderr and gives 2."""
    args = parser.parse_args(argv)
    try:
        body(args)
    except USER_ERRORS as err:
        message = " ".join(str(err).split())
        # the command line's own output (as argparse writes its usage errors), not a log record
        sys.stderr.write(f"error: {message}\n")
        return 2
    return 0


def __getattr__(name: str) -> Any:
    """`SAMPLERS`: the names of the sampler registry (ldm.sampling.SAMPLERS) as a tuple, read when asked for."""
    if name == "SAMPLERS":
        from ldm.sampling import SAMPLERS as REGISTRY

        return tuple(REGISTRY)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def configure_logging() -> None:
    """INFO messages of the package on stderr (scripts call this when run from the command line)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


# ----------------------------------------------------------------------------------------- flags
def add_model_flags(parser: argparse.ArgumentParser, default_config: str | None = None,
                    default_ckpt: str | None = None) -> None:
    """--config, --ckpt, -r/--resume, --ema, --device, --precision (shared by the image scripts)."""
    add = parser.add_argument
    add("--config", default=None, help=f"model config (default: the run's configs with -r, else {default_config})")
    add("--ckpt", default=None, help=f"checkpoint (.ckpt or .safetensors) or a main.py run directory "
                                     f"(default: {default_ckpt})")
    add("-r", "--resume", default=None, metavar="LOGDIR",
        help="a main.py run logs/<run> (or a checkpoint inside it): its configs and checkpoints/last.ckpt")
    add("--ema", action="store_true", help="sample with the checkpoint's EMA weights (model_ema.*)")
    add("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    add("--precision", choices=PRECISIONS, default="autocast",
        help="autocast: fp16 on CUDA, fp32 on CPU; bf16: bfloat16 autocast; full: fp32")
    add("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile the UNet (inductor, cached on disk; the first run compiles); default: only where it "
             "pays for itself within the run (large models and many steps, see ldm.acceleration.compile_pays)")
    parser.set_defaults(default_config=default_config, default_ckpt=default_ckpt)


def add_prompt_flags(parser: argparse.ArgumentParser, outdir: str) -> None:
    """--prompt, --from-file, --outdir, --C and --f (as the original SD scripts)."""
    add = parser.add_argument
    add("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar",
        help="the prompt to render")
    add("--from-file", dest="from_file", type=str, help="a file with one prompt per line (instead of --prompt)")
    add("--outdir", type=str, nargs="?", default=outdir, help="where to write")
    add("--C", type=int, default=None, help="latent channels (default: the model's)")
    add("--f", type=int, default=None, help="first-stage downsampling factor (default: the model's)")


def read_prompt_flags(args: argparse.Namespace) -> list[str]:
    """The prompts of --from-file, else [--prompt] (which must not be empty)."""
    if args.from_file:
        return read_prompts(args.from_file)
    return [check_prompt(args.prompt)]


def check_prompt(prompt: str | None, alternative: str = " (or --from-file)") -> str:
    """The prompt, which must not be empty (`alternative` names what may be given instead)."""
    if not (prompt or "").strip():
        raise ScriptError(f"--prompt is empty; give a prompt{alternative}")
    return prompt


def check_latent_flags(args: argparse.Namespace, model: Any) -> None:
    """--C and --f, when given, must be the model's latent channels and first-stage factor."""
    factor = first_stage_factor(model)
    if args.f is not None and args.f != factor:
        raise ScriptError(f"--f {args.f} differs from the model's first-stage downsampling factor {factor}")
    if args.C is not None and args.C != model.channels:
        raise ScriptError(f"--C {args.C} differs from the model's latent channels {model.channels}")


def add_sampling_flags(parser: argparse.ArgumentParser, n_iter: int, n_samples: int, scale: float) -> None:
    """--steps/--ddim_steps, --ddim_eta, --n_iter, --n_samples, --n_rows, --scale, --seed, --fixed_code, outputs."""
    add = parser.add_argument
    add("--steps", "--ddim_steps", dest="steps", type=int, default=50, help="sampling steps")
    add("--ddim_eta", type=float, default=0.0, help="eta of DDIM (0: deterministic)")
    add("--n_iter", type=int, default=n_iter, help="sample this often")
    add("--n_samples", type=int, default=n_samples, help="samples per prompt and iteration (the batch size)")
    add("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    add("--scale", type=float, default=scale, help="classifier-free guidance scale (1: none)")
    add("--seed", type=int, default=42, help="seed of the first sample")
    add("--fixed_code", action="store_true", help="the same start codes in every iteration")
    add("--skip_grid", action="store_true", help="do not write the grid")
    add("--skip_save", action="store_true", help="do not write the individual samples")


def add_sampler_flags(parser: argparse.ArgumentParser, eta_flag: bool = True) -> None:
    """--sampler NAME (any of ldm.sampling.SAMPLERS), --plms and --dpm/--dpm_solver (the original flags, aliases),
    --schedule (the noise-level spacing), --eta (unless the script has its own) and --guidance_rescale."""
    from ldm.sampling import ALIASES, SAMPLERS as REGISTRY
    from ldm.sampling.schedule import SPACINGS

    add = parser.add_argument
    add("--sampler", default=None, choices=(*REGISTRY, *ALIASES), metavar="NAME",
        help=f"the sampler: {', '.join(REGISTRY)} (default: ddim; see the README's Samplers table)")
    add("--plms", action="store_true", help="PLMS sampling (--sampler plms)")
    add("--dpm", "--dpm_solver", dest="dpm", action="store_true",
        help="DPM-Solver++(2M) with the timesteps of the original --dpm (the DPMSolverSampler class)")
    add("--schedule", dest="spacing", choices=SPACINGS, default=None,
        help="noise-level spacing (default: the sampler's): karras, exponential, trailing, ...")
    if eta_flag:
        add("--eta", type=float, default=None,
            help="noise of the stochastic samplers (ancestral ones: default 1); for ddim it overrides --ddim_eta")
    add("--guidance_rescale", type=float, default=0.0,
        help="rescale classifier-free guidance towards the conditional std (Lin et al. 2023; 0: off, 0.7 typical)")


def sampler_name(args: argparse.Namespace) -> str:
    """The sampler the flags ask for: --sampler, --plms ("plms") or --dpm ("dpm"), default ddim."""
    chosen = [name for name, flag in (("plms", getattr(args, "plms", False)), ("dpm", getattr(args, "dpm", False)))
              if flag]
    if len(chosen) > 1:
        raise ScriptError("--plms and --dpm exclude each other")
    if getattr(args, "sampler", None) and chosen:
        raise ScriptError(f"--sampler {args.sampler} and --{chosen[0]} exclude each other")
    return getattr(args, "sampler", None) or (chosen[0] if chosen else "ddim")


def sampler_eta(args: argparse.Namespace, name: str, ddim_default: float = 0.0) -> float | None:
    """The eta the sampler runs with from the flags (see `resolve_eta`); `ddim_default` stands for --ddim_eta in a
    script without that flag (sample_diffusion.py's DDIM runs with eta 1, as the original's)."""
    ddim_eta = getattr(args, "ddim_eta", None)
    if ddim_eta is None:
        ddim_eta = ddim_default if name == "ddim" else 0.0
    return resolve_eta(name, getattr(args, "eta", None), ddim_eta)


def resolve_eta(name: str, eta: float | None, ddim_eta: float = 0.0) -> float | None:
    """`eta` when given, else `ddim_eta` for ddim (or for any sampler when it is not 0), else None (the sampler's own
    default: 1 for the ancestral samplers). The scripts' --eta / --ddim_eta and the web UI's eta follow this rule."""
    if eta is not None:
        return eta
    return ddim_eta if name == "ddim" or ddim_eta else None


def sampler_options(args: argparse.Namespace) -> dict[str, Any]:
    """make_sampler's options from the flags (the spacing of --schedule)."""
    spacing = getattr(args, "spacing", None)
    return {"spacing": spacing} if spacing else {}


def sampler_from_args(args: argparse.Namespace, model: Any, steps: int,
                      ddim_default: float = 0.0) -> tuple[str, Any, float | None]:
    """(name, sampler, eta) the sampler flags ask for, checked against the model before anything runs."""
    name = sampler_name(args)
    eta, options = sampler_eta(args, name, ddim_default), sampler_options(args)
    check_steps(name, steps, eta, model, **options)
    return name, make_sampler(name, model, **options), eta


def check_counts(args: argparse.Namespace) -> None:
    """--n_samples, --n_iter and --steps (those the script has) must be positive."""
    for flag in ("n_samples", "n_iter", "steps"):
        if getattr(args, flag, 1) < 1:
            raise ScriptError(f"--{flag} must be at least 1, got {getattr(args, flag)}")


def load_from_args(args: argparse.Namespace) -> tuple[object, torch.device, str]:
    """(model, device, checkpoint path) from the model flags."""
    device = pick_device(args.device)
    files, ckpt = resolve_model_files(args.config, args.ckpt, args.resume, args.default_config, args.default_ckpt)
    reuse_freed_memory()  # a sampling run allocates the same large activations at every step
    _, model = load_model(files, ckpt, device, use_ema=args.ema)
    if getattr(args, "precision", None) == "bf16":
        warn_if_emulated_bf16(device)
        if not getattr(args, "ipex", False):  # ipex.optimize makes its own bf16 weights from the fp32 ones
            freed = store_for_autocast(unet_of(model), torch.bfloat16)
            logger.info("--precision bf16: the UNet's convolution and linear weights kept in bf16 (%.2f GB freed; "
                        "autocast would compute with these copies anyway)", freed / 1e9)
    if getattr(args, "compile", None):
        compile_unet(model, freeze=True)
    return model, device, ckpt


def compile_by_default(args: argparse.Namespace, model: Any, unet_calls: int) -> None:
    """Without --compile / --no-compile, compile the UNet when it pays for itself within this run."""
    if getattr(args, "compile", None) is None and compile_pays(model, unet_calls):
        logger.info("compiling the UNet: %d calls pay for it (--no-compile to run eager; compiling with freezing "
                    "holds a second, prepacked copy of the UNet's weights)", unet_calls)
        compile_unet(model, freeze=True)


# ----------------------------------------------------------------------------------------- models
def _run_of(path: str) -> tuple[str, str]:
    """(run directory, checkpoint) of a main.py run directory or of a checkpoint inside its checkpoints/."""
    if os.path.isdir(path):
        ckpt = os.path.join(path, "checkpoints", "last.ckpt")
        if not os.path.isfile(ckpt):
            raise ScriptError(f"'{path}' is a directory but not a main.py run: it has no checkpoints/last.ckpt")
        return os.path.normpath(path), ckpt
    parent = os.path.dirname(os.path.abspath(path))
    while os.path.basename(parent) != "checkpoints":  # also checkpoints/trainstep_checkpoints/<file>
        if os.path.dirname(parent) == parent:
            return "", path
        parent = os.path.dirname(parent)
    return os.path.dirname(parent), path


def run_configs(run: str) -> list[str]:
    """The configs main.py saved for a run (merged in this order, as main.py does on resume)."""
    return sorted(glob.glob(os.path.join(run, "configs", "*.yaml")))


def resolve_model_files(config: str | None, ckpt: str | None, resume: str | None = None,
                        default_config: str | None = None, default_ckpt: str | None = None) -> tuple[list[str], str]:
    """The config files and checkpoint a script loads.

    `resume` (a run directory or a checkpoint inside one) and `ckpt` pointing into a run give the run's
    checkpoint, and its configs unless `config` is given; otherwise `config` / `ckpt` or their defaults.
    """
    flag = "-r/--resume" if resume else "--ckpt"
    ckpt_arg = resume or ckpt or default_ckpt
    if not ckpt_arg:
        raise ScriptError("no model given: pass --config and --ckpt, or -r/--resume logs/<run>")
    if not os.path.exists(ckpt_arg):
        raise ScriptError(f"{flag}: checkpoint '{ckpt_arg}' does not exist")
    run, ckpt_path = _run_of(ckpt_arg)
    if config:
        files = [config]
    elif run and run_configs(run):
        files = run_configs(run)
    elif run or resume:
        raise ScriptError(f"{flag}: run '{run or ckpt_arg}' has no configs/*.yaml; pass --config")
    elif default_config:
        files = [default_config]
    else:
        raise ScriptError("no config given: pass --config (or -r/--resume logs/<run>)")
    for path in files:
        if not os.path.isfile(path):
            raise ScriptError(f"--config: config file '{path}' does not exist")
    return files, ckpt_path


def _repo_relative_paths(node: Any) -> None:
    """Make `*_path` strings that only exist relative to the repository root (e.g. tokenizer_path) absolute."""
    if not isinstance(node, DictConfig):
        return
    for key, value in node.items():
        if isinstance(value, DictConfig):
            _repo_relative_paths(value)
        elif (isinstance(value, str) and str(key).endswith("_path") and value and not os.path.isabs(value)
              and not os.path.exists(value) and (REPO / value).exists()):
            node[key] = str(REPO / value)


def load_model(config_files: Sequence[str], ckpt: str, device: torch.device, use_ema: bool = False) -> tuple[DictConfig, Any]:
    """The merged config of `config_files` and the model loaded from `ckpt`, in eval mode on `device`."""
    config, _ = load_config(list(config_files), [])
    _repo_relative_paths(config)
    return config, load_model_from_config(config, ckpt, device=device, use_ema=use_ema)


def checkpoint_label(ckpt: str) -> str:
    """A short name for a checkpoint in PNG metadata: `<run>/<file>` inside a main.py run, else the file name."""
    run, _ = _run_of(ckpt)
    name = os.path.basename(ckpt)
    return f"{os.path.basename(run)}/{name}" if run else name


def pick_device(name: str | None) -> torch.device:
    """--device: cuda when available by default; asking for cuda without it is a user error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ScriptError("--device cuda: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """--precision: `full` is fp32; `bf16` autocasts to bfloat16; `autocast` is fp16 on CUDA and fp32 on CPU
    (CPU fp16 kernels are slow and CPU bf16 changes the images, so CPU users ask for bf16 explicitly)."""
    if precision == "full" or (precision == "autocast" and device.type != "cuda"):
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "autocast" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sample_seeds(first: int, count: int) -> list[int]:
    """The seeds of `count` consecutive samples starting at `first`: sample k has its own seed first + k."""
    return [first + k for k in range(count)]


def image_multiple(model: Any) -> int:
    """Image sides must be multiples of this: the first stage's downsampling times the UNet's."""
    first = 2 ** int(getattr(model, "num_downs", 0) or 0)
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    levels = len(getattr(unet, "channel_mult", (1,)))
    return first * 2 ** (levels - 1)


def first_stage_factor(model: Any) -> int:
    """Pixels per latent pixel along each side (1 for pixel-space models)."""
    return 2 ** int(getattr(model, "num_downs", 0) or 0)


def check_size(height: int, width: int, multiple: int, flags: tuple[str, str] = ("--H", "--W")) -> None:
    """H and W must be positive multiples of `multiple`."""
    for flag, value in zip(flags, (height, width)):
        if value <= 0 or value % multiple:
            raise ScriptError(f"{flag} {value} must be a positive multiple of {multiple}, the model's downsampling "
                              "factor (first stage x UNet)")


# ----------------------------------------------------------------------------------------- conditioning
def is_text_model(model: Any) -> bool:
    """Whether the model is conditioned on captions alone (one caption key, read by its cond stage(s))."""
    from ldm.models.diffusion.latent_diffusion import TEXT_KEYS

    keys = set(getattr(model, "conditioning_input_keys", ()))
    return is_conditional(model) and len(keys) == 1 and keys <= set(TEXT_KEYS)


def is_class_model(model: Any) -> bool:
    """Whether the model is conditioned on class labels."""
    from ldm.models.diffusion.latent_diffusion import LABEL_KEYS

    return is_conditional(model) and getattr(model, "cond_stage_key", None) in LABEL_KEYS


def is_conditional(model: Any) -> bool:
    """Whether the UNet reads any conditioning."""
    return getattr(getattr(model, "model", None), "conditioning_key", None) is not None


def text_conditioning(model: Any, prompts: Sequence[str], scale: float, negative_prompt: str = "") -> tuple[Any, Any]:
    """(c, uc) role dicts for captions; uc (None when scale == 1) is the negative prompt's conditioning, or with no
    negative prompt the model's null (the empty caption for a single text encoder)."""
    key = model.conditioning_input_keys[0]
    c, uc = guidance_pair(model, {key: list(prompts)}, len(prompts), scale)
    if uc is not None and negative_prompt:
        uc = model.get_conditioning({key: [negative_prompt] * len(prompts)})
    return c, uc


def guidance_pair(model: Any, inputs: Mapping[str, Any], batch_size: int, scale: float) -> tuple[Any, Any]:
    """(c, uc) role dicts for raw conditioning inputs keyed by batch key; uc (None when scale == 1) is the
    model's null conditioning for classifier-free guidance."""
    c = model.get_conditioning(inputs)
    uc = model.guidance_unconditional(c, batch_size, inputs=inputs) if scale != 1.0 else None
    return c, uc


def prompt_conditioning(model: Any, prompts: Sequence[str], scale: float,
                        negative_prompt: str = "") -> tuple[Any, Any]:
    """(c, uc) for a text model, (None, None) for an unconditional one; other conditionings are a user error."""
    if is_text_model(model):
        return text_conditioning(model, prompts, scale, negative_prompt)
    if not is_conditional(model):
        return None, None
    raise ScriptError(f"the model is conditioned on '{getattr(model, 'cond_stage_key', None)}', not on text; "
                      "this script samples text-conditioned or unconditional models")


def class_conditioning(model: Any, labels: Sequence[int], scale: float) -> tuple[Any, Any]:
    """(c, uc) role dicts for class labels; uc is the null class when scale != 1, else None."""
    embedder = model.cond_stage_model
    key = getattr(embedder, "key", model.cond_stage_key)
    n_classes = getattr(embedder, "n_classes", None)
    if n_classes is not None and any(not 0 <= int(label) < n_classes for label in labels):
        raise ScriptError(f"--classes: labels must lie in [0, {n_classes - 1}], got {list(labels)}")
    inputs = {key: torch.tensor([int(x) for x in labels], device=model.device)}
    return guidance_pair(model, inputs, len(labels), scale)


# ----------------------------------------------------------------------------------------- samplers
def make_sampler(name: str, model: Any, **options: Any) -> Any:
    """The sampler object of a registered name (or alias: "dpm"): DDIMSampler, PLMSSampler, DPMSolverSampler or
    ldm.models.diffusion.sampler.Sampler; `options` (spacing, final, sampler options) go to its constructor."""
    from ldm.models.diffusion.sampler import make_sampler as build

    try:
        return build(name, model, **options)
    except ValueError as err:
        raise ScriptError(f"--sampler {name}: {err}") from err


def check_steps(sampler_name: str, steps: int, eta: float | None, model: Any, **options: Any) -> None:
    """Steps and eta the sampler accepts, checked before anything runs (`options` as for make_sampler)."""
    import inspect

    from ldm.sampling import sampler_spec

    try:
        spec = sampler_spec(sampler_name)
    except ValueError as err:
        raise ScriptError(f"--sampler: {err}") from err
    if eta and "eta" not in inspect.signature(spec.fn).parameters:
        if sampler_name == "plms":
            raise ScriptError(f"--ddim_eta {eta}: PLMS is deterministic and needs eta 0")
        raise ScriptError(f"--eta {eta}: sampler '{sampler_name}' draws no noise; eta applies to ddim and the "
                          "ancestral samplers")
    sampler = make_sampler(sampler_name, model, **options)
    try:
        sampler.prepare(steps, eta or 0.0, False)
        sampler.make_sigmas(steps)
    except ValueError as err:
        raise ScriptError(f"--steps {steps}: {err}") from err


def sample_latents(sampler: Any, steps: int, c: Any, uc: Any, scale: float, eta: float, shape: Sequence[int],
                   seeds: Sequence[int], **kwargs: Any) -> torch.Tensor:
    """Latents from a sampler with per-sample seeds (sample i depends on seeds[i] only)."""
    samples, _ = sampler.sample(S=steps, conditioning=c, batch_size=len(seeds), shape=list(shape),
                                unconditional_guidance_scale=scale, unconditional_conditioning=uc, eta=eta,
                                seeds=list(seeds), verbose=False, **kwargs)
    return samples


def encode_image(model: Any, image: torch.Tensor) -> torch.Tensor:
    """The scaled latent of images in [-1, 1]: the mode of a KL posterior (the original sampled it)."""
    from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

    posterior = model.encode_first_stage(image)
    if isinstance(posterior, DiagonalGaussianDistribution):
        posterior = posterior.mode()
    return model.get_first_stage_encoding(posterior)


# ----------------------------------------------------------------------------------------- images
def read_image(path: str, flag: str, mode: str = "RGB") -> Image.Image:
    """An image file opened fully; a missing or unreadable file is a user error naming the flag."""
    if not os.path.isfile(path):
        raise ScriptError(f"{flag}: image '{path}' does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ScriptError(f"{flag}: '{path}' is not a readable image ({type(err).__name__})") from err


def image_to_tensor(image: Image.Image, device: torch.device) -> torch.Tensor:
    """An RGB PIL image as a (1, 3, H, W) tensor in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].to(device)


def mask_to_tensor(image: Image.Image, device: torch.device) -> torch.Tensor:
    """A mask image as a (1, 1, H, W) tensor of 0/1 (pixels brighter than half are 1)."""
    array = (np.asarray(image.convert("L"), dtype=np.float32) / 255.0 > 0.5).astype(np.float32)
    return torch.from_numpy(array)[None, None].to(device)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] as (B, H, W, 3) uint8."""
    images = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return images.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


def grid_image(images: torch.Tensor, nrow: int) -> Image.Image:
    """One image of `images` ((B, 3, H, W) in [-1, 1]) in rows of `nrow`, 2-pixel gaps."""
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().clamp(-1, 1), nrow=max(1, nrow), padding=2, pad_value=-1.0)
    return Image.fromarray(to_uint8(grid[None])[0])


def save_png(image: Image.Image | np.ndarray, path: str | os.PathLike, metadata: Mapping[str, Any]) -> None:
    """Write a PNG with text chunks (one per metadata entry) under a temporary name, then rename it."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        if value is not None:
            info.add_text(str(key), str(value))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def next_index(folder: str | os.PathLike, pattern: str = r"(\d+)\.png") -> int:
    """One more than the largest number of the files in `folder` matching `pattern` (0 when none)."""
    regex = re.compile(pattern)
    numbers = [int(m.group(1)) for name in (os.listdir(folder) if os.path.isdir(folder) else [])
               if (m := regex.fullmatch(name))]
    return max(numbers, default=-1) + 1


Finish = Callable[[np.ndarray], np.ndarray]


def save_samples(images: torch.Tensor, folder: str | os.PathLike, metadata: Sequence[Mapping[str, Any]],
                 finish: Finish | None = None) -> list[str]:
    """One PNG per image, `NNNNN.png` numbered after the files already there (each (H, W, 3) uint8 image passed
    through `finish` first, e.g. a watermark); returns the paths."""
    start = next_index(folder, r"(\d{5,})\.png")
    paths = []
    for k, (pixels, meta) in enumerate(zip(to_uint8(images), metadata)):
        path = os.path.join(folder, f"{start + k:05}.png")
        save_png(pixels if finish is None else finish(pixels), path, meta)
        paths.append(path)
    return paths


def save_grid(images: torch.Tensor, outdir: str | os.PathLike, nrow: int, metadata: Mapping[str, Any],
              finish: Finish | None = None) -> str:
    """`grid-NNNN.png` in `outdir`, numbered after the grids already there (through `finish` as save_samples)."""
    index = next_index(outdir, r"grid-(\d+)\.png")
    path = os.path.join(outdir, f"grid-{index:04}.png")
    grid = grid_image(images, nrow)
    save_png(grid if finish is None else finish(np.asarray(grid)), path, metadata)
    return path


def sample_prompts(args: argparse.Namespace, prompts: Sequence[str],
                   sample_batch: Callable[[list[str], list[int]], Any], finish: Finish | None = None) -> list[str]:
    """Run `sample_batch(prompts, seeds)` (an `ldm.pipelines` task: images in [-1, 1] and their metadata) over the
    prompts --n_iter times; write the samples and the grid (unless --skip_save / --skip_grid), each uint8 image
    through `finish` when given; returns the paths.

    One prompt is sampled in batches of --n_samples copies, a prompt file in batches of --n_samples prompts (as the
    original scripts). Sample k of batch b in iteration n has the seed `--seed + (n * batches + b) * n_samples + k`
    (`--seed + k` with --fixed_code). The grid has the first sample's metadata with all prompts and seeds.
    """
    batches = [list(prompts) * args.n_samples] if len(prompts) == 1 else list(batched(prompts, args.n_samples))
    written, all_images, all_seeds, first_meta = [], [], [], {}
    for n in trange(args.n_iter, desc="Sampling"):
        for b, batch in enumerate(batches):
            first = args.seed if args.fixed_code else args.seed + (n * len(batches) + b) * args.n_samples
            seeds = sample_seeds(first, len(batch))
            samples = sample_batch(batch, seeds)
            if not args.skip_save:
                written += save_samples(samples.images, os.path.join(args.outdir, "samples"), samples.metadata, finish)
            all_images.append(samples.images)
            all_seeds += seeds
            first_meta = first_meta or samples.metadata[0]
    if not args.skip_grid:
        grid_meta = {**first_meta, "prompt": prompts[0] if len(prompts) == 1 else repr(list(prompts)),
                     "seed": repr(all_seeds)}
        written.append(save_grid(torch.cat(all_images), args.outdir, args.n_rows or args.n_samples, grid_meta, finish))
    logger.info("wrote %d file(s) to %s", len(written), args.outdir)
    return written


def sample_metadata(**entries: Any) -> dict[str, Any]:
    """PNG text entries: None values left out, floats written as Python prints them."""
    return {key: value for key, value in entries.items() if value is not None}


def batched(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive chunks of `items` of at most `size`."""
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def read_prompts(path: str, flag: str = "--from-file") -> list[str]:
    """One prompt per non-empty line of a text file."""
    if not os.path.isfile(path):
        raise ScriptError(f"{flag}: prompt file '{path}' does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            prompts = [line.strip() for line in handle if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ScriptError(f"{flag}: '{path}' is not a readable text file ({type(err).__name__})") from err
    if not prompts:
        raise ScriptError(f"{flag}: prompt file '{path}' holds no prompt (one per line expected)")
    return prompts


def downsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """A pixel mask (1 = fill) at latent resolution: a latent pixel is filled when any of its pixels is."""
    return F.max_pool2d(mask, kernel_size=factor) if factor > 1 else mask

