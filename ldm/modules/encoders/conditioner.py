"""A conditioner of several embedders, in the manner of sgm's `GeneralConditioner` (Stability-AI/generative-models).

Each embedder reads its own batch key(s), may be trainable or frozen, is dropped to its null conditioning with
probability `ucg_rate` while training (classifier-free guidance, Ho & Salimans 2022, Alg. 1), and its output goes
to a role of the role dict (`ldm.modules.encoders.roles`): named by `role`, or read from the output's rank
(1-2: vector, 3: crossattn, 4-5: concat). The embedders of one role are joined: cross-attention contexts along the
features (as SDXL's two text encoders, 768 + 1280 = 2048), concat channels and vectors along dim 1. So SDXL-style
multi-encoder conditioning, or a new conditioning input, is a config:

    cond_stage_config:
      target: ldm.modules.encoders.conditioner.GeneralConditioner
      params:
        emb_models:
          - {input_key: txt, ucg_rate: 0.1, target: ldm.modules.encoders.modules.FrozenCLIPEmbedder, params: {...}}
          - {input_key: txt, ucg_rate: 0.1, role: vector, target: ..., params: {...}}

`LatentDiffusion` takes it as its `cond_stage_config` (state_dict keys `cond_stage_model.embedders.<i>.*`).
`embed` is the loop itself; the task models run their concat inputs through it too.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ldm.modules.encoders.roles import CONDITIONER_CAT_DIMS, RANK_ROLES, ROLES, batch_size_of
from ldm.util import ConfigError, _locate, freeze_module, instantiate_from_config

logger = logging.getLogger(__name__)

SPEC_KEYS = ("input_key", "input_keys", "ucg_rate", "is_trainable", "role", "legacy_ucg_value")
DropFn = Callable[[int, float], torch.Tensor]


@dataclass(frozen=True)
class EmbedderSpec:
    """How one embedder reads a batch and where its output goes.

    `input_keys`: the batch keys whose values are its positional inputs; `role`: its output's role (a tuple of
    roles for an embedder returning several tensors; None reads each from its rank); `ucg_rate`: the training
    probability of dropping a sample to the null conditioning, which is zeros or, with `legacy_ucg_value`, the
    embedding of that input value (e.g. the empty caption ""); `is_trainable`: runs with gradients.
    """

    input_keys: tuple[str, ...]
    role: str | tuple[str, ...] | None = None
    ucg_rate: float = 0.0
    is_trainable: bool = False
    legacy_ucg_value: Any = None
    name: str = "embedder"

    def __post_init__(self) -> None:
        if not self.input_keys:
            raise ConfigError(f"{self.name}: give input_key (or input_keys), the batch key(s) it reads")
        if not 0.0 <= self.ucg_rate <= 1.0:
            raise ConfigError(f"{self.name}: ucg_rate must lie in [0, 1], got {self.ucg_rate}")
        roles = (self.role,) if isinstance(self.role, str) else (self.role or ())
        if any(role not in ROLES for role in roles):
            raise ConfigError(f"{self.name}: role {self.role!r} unknown; expected one of {', '.join(ROLES)}")
        if self.legacy_ucg_value is not None and len(self.input_keys) != 1:
            raise ConfigError(f"{self.name}: legacy_ucg_value replaces one input; it reads {list(self.input_keys)}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], name: str) -> EmbedderSpec:
        """The spec part of one `emb_models` entry (everything but target/params)."""
        unknown = sorted(set(config) - set(SPEC_KEYS) - {"target", "params"})
        if unknown:
            raise ConfigError(f"{name}: unknown key(s) {unknown}; an embedder takes target, params and "
                              f"{', '.join(SPEC_KEYS)}")
        if ("input_key" in config) == ("input_keys" in config):
            raise ConfigError(f"{name}: give exactly one of input_key and input_keys")
        keys = (config["input_key"],) if "input_key" in config else tuple(config["input_keys"])
        role = config.get("role")
        role = tuple(role) if role is not None and not isinstance(role, str) else role
        return cls(tuple(map(str, keys)), role, float(config.get("ucg_rate", 0.0)),
                   bool(config.get("is_trainable", False)), config.get("legacy_ucg_value"), name)


def global_drop(n: int, rate: float) -> torch.Tensor:
    """Which of n samples to drop (bool [n], CPU), drawn from the global torch generator."""
    return torch.rand(n) < rate


def embed(embedders: Sequence[tuple[EmbedderSpec, Callable[..., Any]]], batch: Mapping[str, Any], *,
          training: bool = False, drop: DropFn = global_drop, zeroed: Sequence[int] = ()) -> dict[str, Any]:
    """The role dict of a batch: each embedder run on its inputs, dropped by its ucg_rate when `training`, all
    zeros when its index is in `zeroed`, and the outputs of one role joined (see the module docstring)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for index, (spec, fn) in enumerate(embedders):
        values = [_batch_value(batch, key, spec.name) for key in spec.input_keys]
        drops = training and spec.ucg_rate > 0.0
        if drops and spec.legacy_ucg_value is not None:  # the input is replaced before embedding
            values[0] = _replace(values[0], drop(_count(values[0], spec), spec.ucg_rate), spec.legacy_ucg_value)
            drops = False
        with nullcontext() if spec.is_trainable else torch.no_grad():
            out = fn(*values)
        # a drop to zero is drawn after the embedder ran (as sgm and the unCLIP original draw it)
        dropped = drop(_count(values[0], spec), spec.ucg_rate) if drops else None
        for role, emb in _outputs(spec, out):
            if index in zeroed:
                emb = _drop_to_zero(emb, torch.ones(emb.shape[0], dtype=torch.bool), spec)
            elif dropped is not None:
                emb = _drop_to_zero(emb, dropped, spec)
            parts.setdefault(role, []).append(emb)
    return {role: _join(role, parts[role]) for role in ROLES if role in parts}


def _batch_value(batch: Mapping[str, Any], key: str, name: str) -> Any:
    if key not in batch:
        raise KeyError(f"{name}: the batch has no key '{key}' (keys: {', '.join(map(str, batch))})")
    return batch[key]


def _count(value: Any, spec: EmbedderSpec) -> int:
    n = batch_size_of(value)
    if n is None:
        raise ValueError(f"{spec.name}: ucg_rate needs a batch of inputs, got {type(value).__name__}")
    return n


def _replace(value: Any, dropped: torch.Tensor, null: Any) -> Any:
    """`value` with the dropped samples replaced by `null` (a copy; lists and tensors)."""
    if isinstance(value, torch.Tensor):
        value = value.clone()
        value[dropped.to(value.device)] = torch.as_tensor(null, dtype=value.dtype, device=value.device)
        return value
    return [null if d else v for v, d in zip(value, dropped.tolist())]


def _outputs(spec: EmbedderSpec, out: Any) -> list[tuple[str, torch.Tensor]]:
    """(role, tensor) pairs of an embedder's output: a mapping of roles, a tensor, or a tuple of tensors."""
    if isinstance(out, Mapping):
        unknown = [role for role in out if role not in ROLES]
        if unknown:
            raise ValueError(f"{spec.name}: returned roles {unknown}; expected {', '.join(ROLES)}")
        return list(out.items())
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    roles = spec.role if isinstance(spec.role, tuple) else (spec.role,) * len(outs)
    if len(roles) != len(outs):
        raise ValueError(f"{spec.name}: role lists {len(roles)} roles for {len(outs)} outputs")
    pairs = []
    for role, emb in zip(roles, outs):
        if role is None:
            if emb.ndim not in RANK_ROLES:
                raise ValueError(f"{spec.name}: an output of rank {emb.ndim} {tuple(emb.shape)} has no role; "
                                 "set role")
            role = RANK_ROLES[emb.ndim]
        pairs.append((role, emb))
    return pairs


def _drop_to_zero(emb: torch.Tensor, dropped: torch.Tensor, spec: EmbedderSpec) -> torch.Tensor:
    if not emb.is_floating_point():
        raise ValueError(f"{spec.name}: integer outputs (class labels) cannot be dropped to zero; set "
                         "legacy_ucg_value to the null input (e.g. the null class)")
    keep = (~dropped).to(device=emb.device, dtype=emb.dtype)
    return emb * keep.reshape(-1, *((1,) * (emb.ndim - 1)))


def _join(role: str, parts: list[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    if any(p.ndim == 1 for p in parts):
        raise ValueError(f"role '{role}': integer class labels cannot be joined with other {role} outputs")
    return torch.cat(parts, dim=CONDITIONER_CAT_DIMS[role])


class GeneralConditioner(nn.Module):
    """Several embedders, each with its batch key(s), ucg_rate, trainability and role; returns a role dict.

    `emb_models`: one config per embedder: `target`/`params` as for any module plus the `EmbedderSpec` keys
    (`input_key` or `input_keys`, `ucg_rate`, `is_trainable`, `role`, `legacy_ucg_value`). Frozen embedders are
    kept in eval mode without gradients. `seed` gives the ucg dropout its own generator (reproducible whatever
    else draws random numbers); None draws from the global torch generator, which main.py seeds. Dropout happens
    in training mode only.
    """

    def __init__(self, emb_models: Sequence[Mapping[str, Any]], seed: int | None = None):
        super().__init__()
        self.embedders = nn.ModuleList()
        self.specs: list[EmbedderSpec] = []
        for i, config in enumerate(emb_models):
            name = f"GeneralConditioner emb_models[{i}] ({config.get('target', '?')})"
            spec = EmbedderSpec.from_config(config, name)
            module = instantiate_from_config({"target": config.get("target"), "params": config.get("params")},
                                             path=_locate(config, None) or f"emb_models[{i}]")
            if not isinstance(module, nn.Module):
                raise ConfigError(f"{name}: builds a {type(module).__name__}, not a torch module")
            self.embedders.append(module if spec.is_trainable else freeze_module(module))
            self.specs.append(spec)
            logger.info("%s: reads %s, ucg_rate %.2f, %s", name, list(spec.input_keys), spec.ucg_rate,
                        "trainable" if spec.is_trainable else "frozen")
        self.seed = seed
        self._generator: torch.Generator | None = None

    @staticmethod
    def declared_roles(emb_models: Sequence[Mapping[str, Any]]) -> tuple[str, ...] | None:
        """The roles a conditioner config feeds when every embedder names its role, else None."""
        roles = []
        for config in emb_models:
            role = config.get("role")
            if role is None:
                return None
            roles += [role] if isinstance(role, str) else list(role)
        return tuple(role for role in ROLES if role in roles)

    @property
    def input_keys(self) -> tuple[str, ...]:
        """Every batch key the embedders read, in order."""
        return tuple(dict.fromkeys(key for spec in self.specs for key in spec.input_keys))

    @property
    def is_trainable(self) -> bool:
        """Whether any embedder trains."""
        return any(spec.is_trainable for spec in self.specs)

    def _drop(self, n: int, rate: float) -> torch.Tensor:
        if self.seed is None:
            return global_drop(n, rate)
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(int(self.seed))
        return torch.rand(n, generator=self._generator) < rate

    def forward(self, batch: Mapping[str, Any], force_zero_embeddings: Sequence[str] | None = None) -> dict[str, Any]:
        """The role dict of `batch`; embedders reading a key of `force_zero_embeddings` give zeros."""
        return embed(list(zip(self.specs, self.embedders)), batch, training=self.training, drop=self._drop,
                     zeroed=self._reading(force_zero_embeddings or ()))

    def _reading(self, keys: Sequence[str]) -> list[int]:
        """The indices of the embedders that read any of `keys`."""
        return [i for i, spec in enumerate(self.specs) if set(spec.input_keys) & set(keys)]

    def get_unconditional_conditioning(
        self, batch_c: Mapping[str, Any], batch_uc: Mapping[str, Any] | None = None,
        force_uc_zero_embeddings: Sequence[str] | None = None,
        force_cond_zero_embeddings: Sequence[str] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(c, uc) for classifier-free guidance, without dropout; the embedders reading a key of
        `force_cond_zero_embeddings` give zeros in c.

        With `force_uc_zero_embeddings` (a list of input keys) uc is sgm's: `batch_uc`'s entries over `batch_c`
        embedded, except the listed embedders, which give zeros. Without it, uc is the null conditioning the
        embedders were trained to drop to: an embedder with ucg_rate > 0 whose key `batch_uc` does not give
        embeds its legacy_ucg_value or gives zeros; every other embedder embeds the conditional input.
        """
        embedders = list(zip(self.specs, self.embedders))
        c = embed(embedders, batch_c, zeroed=self._reading(force_cond_zero_embeddings or ()))
        uc_batch = dict(batch_c if batch_uc is None else {**batch_c, **batch_uc})
        if force_uc_zero_embeddings is not None:
            return c, embed(embedders, uc_batch, zeroed=self._reading(force_uc_zero_embeddings))
        zeroed = []
        for i, spec in enumerate(self.specs):
            key = spec.input_keys[0]
            if spec.ucg_rate == 0.0 or (batch_uc is not None and key in batch_uc):
                continue
            if spec.legacy_ucg_value is None:
                zeroed.append(i)
            else:
                everyone = torch.ones(_count(uc_batch[key], spec), dtype=torch.bool)
                uc_batch[key] = _replace(uc_batch[key], everyone, spec.legacy_ucg_value)
        return c, embed(embedders, uc_batch, zeroed=zeroed)
