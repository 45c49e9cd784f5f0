"""Config plumbing shared by every entry point: build objects from `target`/`params` configs."""
from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

logger = logging.getLogger(__name__)

# Sentinels the original configs use in place of a sub-model config.
FIRST_STAGE_SENTINEL = "__is_first_stage__"
UNCONDITIONAL_SENTINEL = "__is_unconditional__"


class ConfigError(ValueError):
    """A config could not be turned into an object; the message names the config key and what was expected."""


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
    module_name, attr = string.rsplit(".", 1)
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
    return obj(**params)


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


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or refused; the message names the file."""


def load_state_dict(path: str, weights_only: bool = True, map_location: Any = "cpu") -> dict:
    """Read a state dict from a Lightning .ckpt ("state_dict" inside), a bare torch file or .safetensors.

    Pickled files are read with `torch.load(weights_only=True)`; a file that needs arbitrary code to
    unpickle is refused unless `weights_only=False` is passed explicitly (only for trusted files).
    """
    import torch

    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(map_location))
        except Exception as err:  # noqa: BLE001 - any parse failure is the file's fault
            raise CheckpointError(f"checkpoint '{path}' is not a readable safetensors file ({err})") from err
    try:
        obj = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as err:  # noqa: BLE001
        if weights_only and "weights_only" in str(err):
            raise CheckpointError(
                f"checkpoint '{path}' contains pickled objects that would run code when loaded; refused. "
                "If you trust the file, load it with weights_only=False"
            ) from err
        raise CheckpointError(f"checkpoint '{path}' could not be read ({type(err).__name__}: {err})") from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(obj).__name__}, expected a state dict")
    return dict(obj)


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
