"""Config plumbing shared by every entry point: build objects from `target`/`params` configs."""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from ldm.errors import UserError

logger = logging.getLogger(__name__)

# Sentinels the original configs use in place of a sub-model config.
FIRST_STAGE_SENTINEL = "__is_first_stage__"
UNCONDITIONAL_SENTINEL = "__is_unconditional__"

# The package trains with the `pytorch_lightning` namespace (the originals', and the `pytorch-lightning`
# distribution). The `lightning` distribution's `lightning.pytorch` holds the same API as separate classes, which
# its Trainer does not recognise (a lightning.pytorch ModelCheckpoint beside ours is a second checkpoint callback),
# so targets spelled in that namespace are resolved onto ours here, the one place every target is imported.
TARGET_NAMESPACE_ALIASES = {"lightning.pytorch.": "pytorch_lightning.", "lightning.fabric.": "lightning_fabric."}


class ConfigError(UserError):
    """A config could not be turned into an object; the message names the config key and what was expected."""


class RejectedParametersError(ConfigError):
    """A config's constructor raised ValueError/TypeError for its parameters; the message names the config key."""


class RejectedParameterTypeError(RejectedParametersError, TypeError):
    """`RejectedParametersError` for a constructor's TypeError (still caught by `except TypeError`)."""


class MissingTargetError(ConfigError, KeyError):
    """A config has no `target` key (also a KeyError, as in the original code)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _locate(config: Any, path: str | None) -> str | None:
    """Where `config` stands inside its root config: the given path, or what an OmegaConf node knows."""
    if path is None:
        full_key = getattr(config, "_get_full_key", None)
        if full_key is not None:
            try:
                path = full_key(None)
            except Exception:  # noqa: BLE001 - a location is a courtesy, never a failure
                path = None
    return path or None


def _where(path: str | None) -> str:
    """A human-readable location for error messages."""
    return f"config '{path}'" if path else "the root config"


def get_obj_from_str(string: str, reload: bool = False, path: str | None = None) -> Any:
    """Import `package.module.Attribute` and return the attribute."""
    if not isinstance(string, str) or "." not in string:
        raise ConfigError(
            f"target {string!r} in {_where(path)} is not a dotted import path "
            "like 'ldm.models.autoencoder.AutoencoderKL'"
        )
    name = string
    for alias, namespace in TARGET_NAMESPACE_ALIASES.items():
        if name.startswith(alias):
            name = namespace + name[len(alias):]
    module_name, attr = name.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"target '{string}' in {_where(path)}: module '{module_name}' could not be imported "
            f"({type(err).__name__}: {err})"
        ) from err
    if reload:
        module = importlib.reload(module)
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ConfigError(
            f"target '{string}' in {_where(path)}: module '{module_name}' has no attribute '{attr}'"
        ) from err


def _accepted_params(obj: Any) -> tuple[list[str], bool]:
    """Names a callable accepts as keywords, and whether it also takes **kwargs."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return [], True  # builtins without a signature: let the call itself decide
    names, var_kw = [], False
    for p in sig.parameters.values():
        if p.kind == p.VAR_KEYWORD:
            var_kw = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.append(p.name)
    return names, var_kw


def instantiate_from_config(config: Any, path: str | None = None, **extra: Any) -> Any:
    """Build `target(**params, **extra)` from a config; the two sentinel strings give None.

    `path` names where the config stands (e.g. 'model.params.unet_config') in error messages;
    OmegaConf nodes know their own location, so it is only needed for plain dicts.
    """
    if isinstance(config, str) and config in (FIRST_STAGE_SENTINEL, UNCONDITIONAL_SENTINEL):
        return None
    if not isinstance(config, Mapping) or "target" not in config:
        raise MissingTargetError(
            f"Expected key `target` to instantiate {_where(_locate(config, path))}; got "
            f"{type(config).__name__} {_short(config)}"
        )
    path = _locate(config, path)
    target = config["target"]
    obj = get_obj_from_str(target, path=path)
    params = config.get("params", None)
    params = {} if params is None else dict(params)
    params.update(extra)
    accepted, var_kw = _accepted_params(obj)
    if not var_kw:
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ConfigError(
                f"{_where(path)}: {target} does not accept parameter(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(accepted) or '(none)'}"
            )
    try:
        return obj(**params)
    except UserError:
        raise  # a nested config or check already named its culprit
    except (ValueError, TypeError) as err:
        kind = RejectedParameterTypeError if isinstance(err, TypeError) else RejectedParametersError
        logger.debug("%s rejected the parameters of %s", target, _where(path), exc_info=True)
        raise kind(f"{_where(path)}: {target} rejected its parameters: {type(err).__name__}: "
                   f"{first_line(err)}") from err


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def count_params(model: Any, verbose: bool = False) -> int:
    """Number of parameters of a torch module (logged when verbose)."""
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        logger.info("%s has %.2f M params.", model.__class__.__name__, total * 1e-6)
    return total


def exists(x: Any) -> bool:
    """True when x is not None."""
    return x is not None


def default(val: Any, d: Any) -> Any:
    """val if it is not None, else d (called when d is a function)."""
    if exists(val):
        return val
    return d() if callable(d) else d


def disabled_train(self: Any, mode: bool = True) -> Any:
    """Replacement for `nn.Module.train` that keeps a frozen module in eval mode."""
    return self


def freeze_module(module: Any) -> Any:
    """Hold a torch module frozen, as the original holds its first and cond stages: eval mode for good (its
    `train` is replaced) and requires_grad=False for every parameter. Returns the module."""
    module.eval()
    module.train = disabled_train.__get__(module)
    for param in module.parameters():
        param.requires_grad = False
    return module


def fused_adam_kwargs(params: Sequence[Any]) -> dict[str, bool]:
    """`{"fused": True}` when torch has a fused Adam/AdamW kernel for every parameter (floating point, on CPU or
    CUDA): one kernel for all tensors instead of a Python loop (44 -> 12 ms a step for 4.4 M parameters in 305
    tensors on 2 CPU cores); `{}` otherwise (e.g. other devices), where torch's default implementation runs."""
    params = list(params)
    fusable = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return {"fused": True} if fusable else {}


class CheckpointError(UserError):
    """A checkpoint file is missing, unreadable or refused; the message names the file."""


# what a checkpoint records besides its weights (Lightning writes them; prune_ckpt keeps them as metadata)
CHECKPOINT_COUNTERS = ("global_step", "epoch")


DTYPE_NAMES = ("bf16", "fp16", "fp32")  # the precisions a flag or config names by these words


def dtype_from_name(name: str | None, what: str = "dtype", nullable: bool = False) -> Any:
    """torch.bfloat16 / float16 / float32 for "bf16" / "fp16" / "fp32" (and None for None where `nullable`); a
    ConfigError naming `what` for anything else."""
    import torch

    if name is None and nullable:
        return None
    if name not in DTYPE_NAMES:
        choices = ", ".join(DTYPE_NAMES) + " or null" if nullable else "bf16, fp16 or fp32"
        raise ConfigError(f"{what}: expected {choices}, got {name!r}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def read_checkpoint(path: str, weights_only: bool = True, map_location: Any = "cpu",
                    mmap: bool = False) -> tuple[dict, dict]:
    """The state dict of a checkpoint file and what it records besides (`global_step`, `epoch` when present).

    `mmap` maps a torch zip file's tensors from the file instead of reading them into memory (pages are read when
    first used; writes stay private); an old-format file that cannot be mapped is read whole."""
    import torch

    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            state = load_file(path, device=str(map_location))
            with safe_open(path, framework="pt") as handle:
                header = handle.metadata() or {}
        except Exception as err:  # noqa: BLE001 - any parse failure is the file's fault
            raise CheckpointError(f"checkpoint '{path}' is not a readable safetensors file ({err})") from err
        meta = {key: int(header[key]) for key in CHECKPOINT_COUNTERS if str(header.get(key, "")).isdigit()}
        return state, meta
    try:
        obj = None
        if mmap:
            try:
                obj = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=True)
            except RuntimeError as err:  # not a zip file: read it whole below
                if "mmap" not in str(err):
                    raise
        if obj is None:
            obj = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as err:  # noqa: BLE001
        if weights_only and "weights_only" in str(err):
            raise CheckpointError(
                f"checkpoint '{path}' contains pickled objects that would run code when loaded; refused. "
                "If you trust the file, load it with weights_only=False"
            ) from err
        raise CheckpointError(f"checkpoint '{path}' could not be read ({type(err).__name__}: {err})") from err
    meta = {}
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        meta = {key: int(obj[key]) for key in CHECKPOINT_COUNTERS if isinstance(obj.get(key), int)}
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(obj).__name__}, expected a state dict")
    return dict(obj), meta


def load_state_dict(path: str, weights_only: bool = True, map_location: Any = "cpu") -> dict:
    """Read a state dict from a Lightning .ckpt ("state_dict" inside), a bare torch file or .safetensors.

    Pickled files are read with `torch.load(weights_only=True)`; a file that needs arbitrary code to
    unpickle is refused unless `weights_only=False` is passed explicitly (only for trusted files).
    """
    return read_checkpoint(path, weights_only, map_location)[0]


def ema_state_dict(state_dict: Mapping[str, Any], source: str) -> dict:
    """`state_dict` with every parameter replaced by its EMA copy, in the naming of `ldm.modules.ema.LitEma`
    (one `model_ema.<name without dots>` buffer per parameter).

    Both layouts of the codebase are understood: diffusion models average their `model` submodule
    (`model.<name>` ← `model_ema.<name without dots>`), autoencoders average the whole module
    (`<name>` ← `model_ema.<name without dots>`). The `model_ema.*` entries are kept. `source` names the
    checkpoint in the error raised when it has no EMA.
    """
    shadow_prefix, model_prefix = "model_ema.", "model."
    out, replaced = dict(state_dict), 0
    for key in state_dict:
        if key.startswith(shadow_prefix):
            continue
        candidates = [key.replace(".", "")]
        if key.startswith(model_prefix):
            candidates.insert(0, key[len(model_prefix):].replace(".", ""))
        shadow = next((shadow_prefix + c for c in candidates if shadow_prefix + c in state_dict), None)
        if shadow is not None:
            out[key] = state_dict[shadow]
            replaced += 1
    if not replaced:
        raise CheckpointError(f"checkpoint '{source}' holds no EMA weights (no model_ema.* entries for its "
                              "parameters); load it without use_ema / --ema")
    logger.info("Using the EMA weights of %d tensors from %s", replaced, source)
    return out


def _model_config(config: Any) -> Any:
    """A private copy of the `model:` section of a config given as a path, dict or OmegaConf node."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, (str, os.PathLike)):
        if not os.path.isfile(config):
            raise ConfigError(f"config file '{os.fspath(config)}' does not exist")
        config = OmegaConf.load(config)
    if not isinstance(config, (Mapping, DictConfig)):
        raise ConfigError(f"expected a config with a 'model' section (a path, dict or OmegaConf), got {_short(config)}")
    config = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(config), resolve=True))
    if "model" in config:
        return config.model
    if "target" in config:
        return config
    raise ConfigError("the config has no 'model' section; expected model: {target: ..., params: ...}")


def _skip_sub_checkpoints(node: Any, where: str = "model") -> None:
    """Set every `params.ckpt_path` under `node` to None: the full checkpoint replaces what they would load."""
    from omegaconf import DictConfig

    if not isinstance(node, DictConfig):
        return
    params = node.get("params")
    if isinstance(params, DictConfig) and params.get("ckpt_path") is not None:
        logger.info("not reading %s.params.ckpt_path=%s: the checkpoint holds those weights", where, params.ckpt_path)
        params.ckpt_path = None
    for key, value in node.items():
        _skip_sub_checkpoints(value, f"{where}.{key}")


def _load_weights(model: Any, own: dict, state: dict) -> tuple[list[str], list[str]]:
    """load_state_dict(strict=False) that takes the checkpoint's tensors over instead of copying them (assign) when
    nothing in the model is shared between two names: with a mapped checkpoint the weights stay in the file's pages
    and the model's freshly initialised ones are freed, so loading needs no second copy of the model. Entries of
    another dtype are converted first (the model keeps its dtypes); a model with tied weights is copied into."""
    import torch

    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    tied = len({id(t) for _, t in named}) < len(named)
    if tied:
        return model.load_state_dict(state, strict=False)
    state = dict(state)
    for key, value in state.items():
        target = own.get(key)
        if isinstance(value, torch.Tensor) and target is not None and (
                value.dtype != target.dtype or value.device != target.device):
            state[key] = value.to(device=target.device, dtype=target.dtype)
    return model.load_state_dict(state, strict=False, assign=True)


@functools.cache
def _libc_function(name: str) -> Any:
    """A C library function from the process's own symbols (glibc's when linked), or None where there is none;
    looked up once (the decoder asks at every upsampling)."""
    import ctypes

    return getattr(ctypes.CDLL(None), name, None)


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the operating system (glibc's malloc_trim; elsewhere nothing).

    After a model's random initial weights are replaced by a checkpoint's mapped tensors, the small ones (biases,
    norms, anything allocated below glibc's mmap threshold, which rises as large blocks are freed) stay in the heap
    as free but resident memory; trimming returns it, so the process's peak later on is the model's, not the model's
    plus the discarded initialisation's leftovers. The autoencoder's decoder trims between its levels for the same
    reason (see `Decoder.forward`)."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters (malloc.h)
# large blocks from the heap, its freed top kept; and glibc's defaults once its dynamic thresholds have grown (as they
# do after the first large blocks are freed)
_HEAP_POLICY = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}
_GLIBC_POLICY = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20, M_MMAP_MAX: 65536}
_REUSING: list[bool] = [False]


def _set_malloc_policy(policy: dict[int, int]) -> bool:
    """glibc's mallopt for each (parameter, value) of `policy`; whether all applied (False where there is none)."""
    mallopt = _libc_function("mallopt")
    return mallopt is not None and all([bool(mallopt(param, value)) for param, value in policy.items()])


def reuse_freed_memory() -> bool:
    """From now on serve large allocations from the C heap and keep its freed top, so large blocks are reused instead
    of mapped afresh (glibc's mallopt; elsewhere nothing); whether it applied. For a process that runs the same
    model call many times (a sampling script), not for one that needs its memory back between phases.

    glibc maps each block above 32 MiB (its highest dynamic mmap threshold) separately and unmaps it when freed, so
    every large activation of a UNet call (an SD v1 feed-forward's 84 MB, the concatenated skips) costs fresh page
    faults at every call; served from the heap, the previous call's pages are reused: SD v1 txt2img at 512² ran its
    steps 7-13% faster. The heap then holds the largest call's working set between calls; `mapping_large_blocks`
    (the decoder uses it) gives it back and restores glibc's usual policy where a different, larger phase follows."""
    _REUSING[0] = _set_malloc_policy(_HEAP_POLICY)
    return _REUSING[0]


@contextlib.contextmanager
def mapping_large_blocks() -> Iterator[None]:
    """Under `reuse_freed_memory`: within the block the heap's free pages go back to the system first, then blocks
    above 32 MiB are mapped and the heap's top trimmed as glibc does by default; elsewhere nothing. An SD decode at
    512² peaked 0.3 GiB higher on top of the sampler's retained working set without it."""
    if not _REUSING[0]:
        yield
        return
    return_freed_memory()
    _set_malloc_policy(_GLIBC_POLICY)
    try:
        yield
    finally:
        _set_malloc_policy(_HEAP_POLICY)


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's private mappings of files (/proc/self/maps; none where it cannot be read)."""
    spans = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/") and fields[1].endswith("p"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    spans.append((start, end))
    except OSError:
        pass
    return spans


def release_file_pages(tensors: Iterable[Any]) -> int:
    """Drop the resident pages of tensors that view a mapped checkpoint file and that nothing will read again; the
    bytes released. `tensors` may be a generator: each is released before the next is drawn.

    A checkpoint loaded with mmap stays one mapping while any of its tensors is in use, and every page a tensor was
    read from (to cast it to another dtype, say) counts towards the process's memory until then. madvise(DONTNEED)
    gives back the pages lying wholly inside each tensor (pages shared with a neighbour stay), and only within a
    private file mapping: were anything to read them again it would see the file's bytes. Tensors in any other memory
    are left alone (there the call would zero live data)."""
    import ctypes
    import mmap

    madvise = _libc_function("madvise")
    spans = _file_mappings() if madvise is not None else []
    page, released = mmap.PAGESIZE, 0
    for tensor in tensors:  # an iterator is consumed whatever happens (its items may be made as it goes)
        if not spans:
            continue
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        first, last = -(-start // page) * page, end // page * page
        if last <= first or not any(lo <= start and end <= hi for lo, hi in spans):
            continue
        if madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED) == 0:
            released += last - first
    return released


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def skipped_initialisation() -> Iterator[set[int]]:
    """Within the block torch.nn.init's functions leave their tensors as allocated (uninitialised); yields the set
    of the skipped tensors' data pointers, filled as the block runs.

    For building a model whose weights a checkpoint is about to replace: drawing an SD v1 model's random initial
    weights took 3.3 s of a 7 s load, for numbers that are thrown away. Whoever uses it must check that every
    skipped tensor was replaced (`uninitialised_tensors`) and build again normally where one was not."""
    import torch

    skipped: set[int] = set()
    originals = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}

    def skip(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        if tensor.numel():
            skipped.add(tensor.data_ptr())
        return tensor

    for name in originals:
        setattr(torch.nn.init, name, skip)
    try:
        yield skipped
    finally:
        for name, function in originals.items():
            setattr(torch.nn.init, name, function)


def uninitialised_tensors(model: Any, skipped: set[int], loaded: Iterable[str]) -> list[str]:
    """Names of the model's parameters and buffers that still hold a tensor `skipped_initialisation` left
    uninitialised and that were not among the `loaded` names (a freed tensor's address reused by a later one can
    only name a tensor needlessly, never miss one)."""
    loaded = set(loaded)
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [name for name, tensor in named
            if name not in loaded and tensor.numel() and tensor.data_ptr() in skipped]


def _load_checkpoint_into(model: Any, state: dict, ckpt: str) -> tuple[list[str], list[str]]:
    """(missing, unexpected) keys of loading `state` (from `ckpt`) into `model`; a CheckpointError naming the file
    when nothing fits or a tensor's shape differs."""
    own = model.state_dict()
    if own and not set(own) & set(state):
        raise CheckpointError(f"checkpoint '{ckpt}' has none of the keys of {type(model).__name__} (it expects e.g. "
                              f"'{next(iter(own))}', the file holds e.g. '{next(iter(state), '(nothing)')}')")
    try:
        return _load_weights(model, own, state)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise CheckpointError(f"checkpoint '{ckpt}' does not fit {type(model).__name__}: {lines[-1]}") from err


def load_model_from_config(config: Any, ckpt: str, device: Any = "cpu", verbose: bool = False,
                           weights_only: bool = True, use_ema: bool = False) -> Any:
    """Build the model of `config` (its `model:` section), load `ckpt` into it, return it in eval mode on `device`.

    `ckpt` is a Lightning .ckpt, a bare state dict or a .safetensors file, read with `weights_only` (a pickle
    that would run code is refused unless `weights_only=False`). `use_ema` loads the EMA weights (`model_ema.*`)
    into the model. `params.ckpt_path` entries in the config are not read: the checkpoint holds the whole model.
    Missing and unexpected keys are logged as warnings (`verbose` is kept for the original signature; nothing is
    printed). `device=None` picks CUDA when available.
    """
    import torch

    model_config = _model_config(config)
    state, meta = read_checkpoint(ckpt, weights_only=weights_only, mmap=True)
    if "global_step" in meta:
        logger.info("Global Step: %d", meta["global_step"])
    has_ema = any(key.startswith("model_ema.") for key in state)
    if use_ema:
        state = ema_state_dict(state, ckpt)
    _skip_sub_checkpoints(model_config)
    with skipped_initialisation() as skipped:  # the checkpoint's weights replace them
        model = instantiate_from_config(model_config, path="model")
    missing, unexpected = _load_checkpoint_into(model, state, ckpt)
    left = uninitialised_tensors(model, skipped, state)
    if left:  # not all in the checkpoint (e.g. EMA weights or a new part): build again with initial weights
        logger.info("checkpoint '%s' lacks %d of the model's tensors (e.g. '%s'): building it with initial weights",
                    ckpt, len(left), left[0])
        model = instantiate_from_config(model_config, path="model")
        missing, unexpected = _load_checkpoint_into(model, state, ckpt)
    del state  # the model holds what it took over; entries it did not use go now
    return_freed_memory()
    if not has_ema and getattr(model, "model_ema", None) is not None:
        logger.info("checkpoint '%s' has no EMA weights: model_ema starts from the loaded weights", ckpt)
        model.model_ema = type(model.model_ema)(model.model)
        missing = [key for key in missing if not key.startswith("model_ema.")]
    for kind, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            logger.warning("%d %s keys loading %s: %s", len(keys), kind, ckpt, keys)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(torch.device(device)).eval()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to `path`; on success it is renamed to `path`, on failure removed.

    The temporary file lives in the same directory, so `os.replace` is an atomic rename on POSIX filesystems:
    readers see either the previous file or the complete new one, never a partial write.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # not mkstemp: its 0600 mode would survive the rename; a unique name keeps the umask's permissions
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:  # the data must be on disk before the rename makes it visible
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# Small helpers of the original `ldm.util` (tensor kinds, caption images, parallel prefetching)
# ---------------------------------------------------------------------------------------------
def ismap(x: Any) -> bool:
    """True for a batch of many-channel maps: a 4-d tensor with more than 3 channels (e.g. one-hot segmentations)."""
    import torch

    return isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] > 3


def isimage(x: Any) -> bool:
    """True for a batch of images: a 4-d tensor with 1 (grey) or 3 (RGB) channels."""
    import torch

    return isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] in (1, 3)


def mean_flat(tensor: Any) -> Any:
    """Mean over all non-batch dimensions: (B, ...) -> (B,)."""
    return tensor.mean(dim=list(range(1, tensor.dim())))


# Where the caption font is looked for, first match wins: the original's data/DejaVuSans.ttf (relative to the working
# directory), then DejaVu Sans by name (FreeType's search of the system font folders, e.g. Debian's fonts-dejavu-core),
# then the copy matplotlib ships; Pillow's built-in scalable font when none of them can be opened.
CAPTION_FONTS = ("data/DejaVuSans.ttf", "DejaVuSans.ttf")


def _matplotlib_dejavu() -> str | None:
    """The DejaVuSans.ttf that matplotlib ships, when matplotlib is installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")
    return path if os.path.isfile(path) else None


def caption_font(size: int) -> Any:
    """The font log_txt_as_img draws with, at `size` points (see CAPTION_FONTS)."""
    from PIL import ImageFont

    candidates = [*CAPTION_FONTS, _matplotlib_dejavu()]
    for candidate in filter(None, candidates):
        try:
            return ImageFont.truetype(candidate, size=size)
        except OSError:
            continue
    logger.debug("no DejaVu Sans font found (%s); captions use Pillow's built-in font", candidates)
    return ImageFont.load_default(size=size)


def log_txt_as_img(wh: tuple[int, int], xc: Sequence[str], size: int = 10) -> Any:
    """Captions drawn black on white, one image each: a float tensor (B, 3, H, W) in [-1, 1].

    `wh` is (width, height); text is cut into lines of int(40 * width / 256) characters, as the original did.
    """
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    width, _ = wh
    font = caption_font(size)
    per_line = max(1, int(40 * (width / 256)))
    images = []
    for text in xc:
        canvas = Image.new("RGB", tuple(wh), color="white")
        lines = "\n".join(text[start:start + per_line] for start in range(0, len(text), per_line))
        ImageDraw.Draw(canvas).text((0, 0), lines, fill="black", font=font)
        images.append(np.asarray(canvas).transpose(2, 0, 1) / 127.5 - 1.0)
    return torch.tensor(np.stack(images), dtype=torch.float32)


def _prefetch_worker(func: Any, queue: Any, part: Any, index: int, pass_worker_id: bool) -> None:
    """Run `func` on one part and put (index, result) — or (index, error text) — then 'Done' on the queue."""
    try:
        result = func(part, worker_id=index) if pass_worker_id else func(part)
        queue.put((index, True, result))
    except Exception as err:  # noqa: BLE001 - reported to the caller, which raises it
        queue.put((index, False, f"{type(err).__name__}: {err}"))
    queue.put("Done")


def _split_for_prefetch(data: Any, n_proc: int, target_data_type: str) -> list:
    """`data` as n_proc parts: np.array_split for arrays; equal slices (the last one shorter) for lists."""
    import numpy as np

    if target_data_type == "ndarray":
        return list(np.array_split(data, n_proc))
    step = max(1, -(-len(data) // n_proc))  # ceil, as the original
    return [data[i:i + step] for i in range(0, len(data), step)]


def parallel_data_prefetch(func: Any, data: Any, n_proc: int, target_data_type: str = "ndarray",
                           cpu_intensive: bool = True, use_worker_id: bool = False) -> Any:
    """Apply `func` to `n_proc` parts of `data` in parallel and join the results in order.

    Processes when `cpu_intensive`, threads otherwise. `data` is an array or any iterable (a dict gives its values);
    with target_data_type 'ndarray' the parts come from np.array_split and the results are concatenated along axis 0,
    with 'list' the results are joined into one list; any other type returns the list of per-part results.
    `use_worker_id` passes `worker_id=<part index>` to `func`. A part that raises ends the call with a RuntimeError
    naming the part (the original waited forever).
    """
    import multiprocessing
    import queue as queue_module
    import threading
    import time

    import numpy as np

    if not isinstance(n_proc, int) or n_proc < 1:
        raise ValueError(f"parallel_data_prefetch: n_proc must be a positive integer, got {n_proc!r}")
    if isinstance(data, np.ndarray) and target_data_type == "list":
        raise ValueError("parallel_data_prefetch: target_data_type='list' expected but data is an ndarray")
    if not isinstance(data, np.ndarray):
        if not isinstance(data, Iterable):
            raise TypeError(f"parallel_data_prefetch: data must be an np.ndarray or an iterable, got {type(data).__name__}")
        if isinstance(data, Mapping):
            logger.warning("parallel_data_prefetch: data is a dict; using its values and ignoring its keys")
            data = list(data.values())
        data = np.asarray(data) if target_data_type == "ndarray" else list(data)
    parts = _split_for_prefetch(data, n_proc, target_data_type)
    if cpu_intensive:
        results_queue, worker = multiprocessing.Queue(1000), multiprocessing.Process
    else:
        results_queue, worker = queue_module.Queue(1000), threading.Thread
    workers = [worker(target=_prefetch_worker, args=(func, results_queue, part, i, use_worker_id))
               for i, part in enumerate(parts)]
    logger.info("parallel_data_prefetch: %d parts on %d %s", len(parts), len(workers),
                "processes" if cpu_intensive else "threads")
    start, gathered, failures, done = time.time(), [None] * len(parts), [], 0
    try:
        for w in workers:
            w.start()
        while done < len(workers):
            message = results_queue.get()
            if message == "Done":
                done += 1
            elif message[1]:
                gathered[message[0]] = message[2]
            else:
                failures.append(f"part {message[0]}: {message[2]}")
    except BaseException:
        for w in workers:
            if cpu_intensive:
                w.terminate()
        raise
    finally:
        for w in workers:
            w.join()
        logger.info("parallel_data_prefetch: done in %.2f s", time.time() - start)
    if failures:
        raise RuntimeError(f"parallel_data_prefetch: {func!r} failed on " + "; ".join(sorted(failures)))
    if target_data_type == "ndarray":
        return np.concatenate([np.asarray(r) for r in gathered], axis=0)
    if target_data_type == "list":
        return [item for r in gathered for item in r]
    return gathered
