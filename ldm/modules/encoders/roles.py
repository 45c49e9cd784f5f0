"""Conditioning as a dict keyed by role — what the UNet reads — and its translation from the original forms.

A role dict is a plain `dict` whose keys are some of:

- ``crossattn``: the cross-attention context, [B, L, D] (with `sequential_crossattn`, a list of them: one per
  transformer block);
- ``concat``: channels concatenated to the noisy latent, [B, C, H, W];
- ``vector``: the UNet's class / ADM input `y`: [B] integer labels (`num_classes` an int) or [B, D] (a noise
  level, a pooled embedding, size conditioning; `num_classes` 'continuous' / 'sequential').

A plain dict rather than a dataclass: the guidance (`ldm.sampling.guidance.concat_conditioning`), the samplers'
batch checks and slicing already handle dicts of tensors, `torch.save` and `copy` take it as it is, and sgm's
`GeneralConditioner` returns the same dict, so its users find the keys they know.

The original forms — a tensor, a list of tensors, or ``{"c_concat": [...], "c_crossattn": [...], "c_adm": y}``,
read according to the model's `conditioning_key` — are translated by `to_roles` through one table, `ROUTES`.
How several parts of one role are joined: the original's ``c_crossattn`` list is joined along the tokens (dim 1),
as its DiffusionWrapper did; a `GeneralConditioner` joins several cross-attention embedders along the features
(dim 2), as sgm does for SDXL (CLIP ViT-L 768 + OpenCLIP ViT-bigG 1280 = a 2048-wide context); ``concat`` parts
are joined along the channels and ``vector`` parts along the features (dim 1) in both.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ldm.util import ConfigError

ROLES = ("crossattn", "concat", "vector")
# the original dict slots, each with the role it feeds unless a conditioning_key routes it elsewhere
LEGACY_SLOTS = {"c_concat": "concat", "c_crossattn": "crossattn", "c_adm": "vector"}
# what each original conditioning_key reads: legacy slot -> role ('adm' feeds the first c_crossattn entry to y)
ROUTES: dict[str | None, dict[str, str]] = {
    None: {},
    "concat": {"c_concat": "concat"},
    "crossattn": {"c_crossattn": "crossattn"},
    "hybrid": {"c_concat": "concat", "c_crossattn": "crossattn"},
    "adm": {"c_crossattn": "vector"},
    "hybrid-adm": {"c_concat": "concat", "c_crossattn": "crossattn", "c_adm": "vector"},
    "crossattn-adm": {"c_crossattn": "crossattn", "c_adm": "vector"},
}
CONDITIONING_KEYS = tuple(ROUTES)
# how the parts of one role are joined by a conditioner (see the module docstring for the original's c_crossattn)
CONDITIONER_CAT_DIMS = {"crossattn": 2, "concat": 1, "vector": 1}
# a conditioner output's role from its rank, as sgm reads it (class labels [B] are a vector too)
RANK_ROLES = {1: "vector", 2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}

ConditioningKey = str | Sequence[str] | None


def check_conditioning_key(key: Any) -> str | tuple[str, ...] | None:
    """One of the original names (None, concat, crossattn, hybrid, adm, hybrid-adm, crossattn-adm) or a list of
    roles (e.g. [crossattn, vector]); lists come back as tuples."""
    if key is None or isinstance(key, str):
        if key not in ROUTES:
            raise ConfigError(f"conditioning_key '{key}' unknown; expected one of {CONDITIONING_KEYS} or a list of "
                             f"roles from {ROLES}")
        return key
    roles = tuple(str(role) for role in key)
    unknown = [role for role in roles if role not in ROLES]
    if not roles or unknown or len(set(roles)) != len(roles):
        raise ConfigError(f"conditioning_key {list(roles)}: a list of conditioning_key roles must name each of "
                         f"{', '.join(ROLES)} at most once")
    return roles


def key_routes(key: str | tuple[str, ...] | None) -> dict[str, str]:
    """Legacy slot -> role for a (checked) conditioning_key; a role list reads each role from its own slot."""
    if key is None or isinstance(key, str):
        return ROUTES[key]
    slot_of = {role: slot for slot, role in LEGACY_SLOTS.items()}
    return {slot_of[role]: role for role in key}


def key_roles(key: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """The roles a (checked) conditioning_key feeds to the UNet."""
    return tuple(key_routes(key).values())


def bare_slot(key: str | tuple[str, ...]) -> str:
    """The slot a bare tensor or list fills: c_concat for conditioning_key 'concat', else c_crossattn (as the
    original apply_model); for a role list without crossattn, the slot of its first role."""
    routes = key_routes(key)
    slot = "c_concat" if tuple(routes.values()) == ("concat",) else "c_crossattn"
    return slot if slot in routes else next(iter(routes))


def bare_role(key: str | tuple[str, ...]) -> str:
    """The role a bare tensor or list feeds — the role of a single cond stage's output."""
    return key_routes(key)[bare_slot(key)]


def is_role_dict(cond: Any) -> bool:
    """Whether `cond` is a role dict (a mapping whose keys are all roles)."""
    return isinstance(cond, Mapping) and all(k in ROLES for k in cond)


def to_roles(cond: Any, key: str | tuple[str, ...] | None, sequential_crossattn: bool = False) -> dict[str, Any]:
    """The role dict of any conditioning form for a model with (checked) conditioning_key `key`.

    A role dict is checked to hold exactly the roles `key` feeds. The original forms are read as the original
    did: a tensor or list goes to c_concat for conditioning_key 'concat' and to c_crossattn otherwise; the
    slots `key` does not read are ignored; a model without conditioning_key ignores its conditioning.
    """
    routes = key_routes(key)
    if key is None:
        return {}
    if cond is None:
        cond = {}
    elif is_role_dict(cond):
        return _checked_roles(dict(cond), key, tuple(routes.values()))
    if isinstance(cond, Mapping):  # the original dict form
        foreign = [k for k in cond if k not in LEGACY_SLOTS]
        if foreign:
            raise ValueError(f"conditioning dict keys {sorted(map(str, cond))}: expected roles ({', '.join(ROLES)}) "
                             f"or the original slots ({', '.join(LEGACY_SLOTS)}), not a mix; unknown: {foreign}")
    else:
        cond = {bare_slot(key): cond if isinstance(cond, list) else [cond]}
    roles = {}
    for slot, role in routes.items():
        value = cond.get(slot)
        if value is None:
            raise ValueError(f"conditioning_key '{_name(key)}' needs {slot}, got None")
        roles[role] = _legacy_value(slot, role, value, sequential_crossattn)
    return roles


def _legacy_value(slot: str, role: str, value: Any, sequential_crossattn: bool) -> Any:
    """One original slot's value as its role reads it (lists joined along dim 1, as the original)."""
    if slot == "c_adm":
        return value
    parts = list(value) if isinstance(value, (list, tuple)) else [value]
    if role == "vector":  # conditioning_key 'adm': y is the first c_crossattn entry
        return parts[0]
    if role == "crossattn" and sequential_crossattn:
        return parts
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _checked_roles(roles: dict[str, Any], key: Any, wanted: tuple[str, ...]) -> dict[str, Any]:
    missing = [role for role in wanted if roles.get(role) is None]
    extra = [role for role in roles if role not in wanted]
    if missing or extra:
        detail = "; ".join(part for part in (f"missing {missing}" if missing else "",
                                             f"not read: {extra}" if extra else "") if part)
        raise ValueError(f"conditioning_key '{_name(key)}' reads the roles {list(wanted)}; the conditioning has "
                         f"{sorted(roles)} ({detail})")
    return roles


def _name(key: Any) -> str:
    return key if isinstance(key, str) or key is None else "[" + ", ".join(key) + "]"


def to_legacy(roles: Mapping[str, Any]) -> dict[str, Any]:
    """The original dict form of a role dict: {"c_concat": [concat], "c_crossattn": [crossattn], "c_adm": vector}."""
    legacy = {}
    if "concat" in roles:
        legacy["c_concat"] = [roles["concat"]]
    if "crossattn" in roles:
        context = roles["crossattn"]
        legacy["c_crossattn"] = list(context) if isinstance(context, (list, tuple)) else [context]
    if "vector" in roles:
        legacy["c_adm"] = roles["vector"]
    return legacy


def take(cond: Any, n: int | None) -> Any:
    """The first `n` samples of any conditioning or raw batch: tensors and lists of values are cut, dicts per
    entry, lists of tensors per element (the original c_crossattn lists); `n=None` keeps everything."""
    if n is None or cond is None:
        return cond
    if isinstance(cond, Mapping):
        return {k: take(v, n) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)) and cond and all(isinstance(v, torch.Tensor) for v in cond):
        return [v[:n] for v in cond]
    return cond[:n]


def batch_size_of(cond: Any) -> int | None:
    """The batch size of a conditioning (its first tensor's, or a list's length), None when it has none."""
    if isinstance(cond, torch.Tensor):
        return cond.shape[0] if cond.ndim else None
    if isinstance(cond, Mapping):
        return next((b for b in map(batch_size_of, cond.values()) if b is not None), None)
    if isinstance(cond, (list, tuple)):
        if cond and all(isinstance(v, torch.Tensor) for v in cond):
            return batch_size_of(cond[0])
        return len(cond)
    return None
