"""Samples for an evaluation: per-sample seeds, captions or class labels taken from the validation data, drawn
with the sampling helpers the scripts use (`ldm.inference`), decoded and quantised to uint8 as PNGs store them."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ldm.evaluation.common import EvaluationError
from ldm.evaluation.features import to_uint8

logger = logging.getLogger(__name__)


def condition_kind(model: Any) -> str | None:
    """'text' for caption models, 'class' for class-label models, None for unconditional ones."""
    from ldm import inference

    if inference.is_text_model(model):
        return "text"
    if inference.is_class_model(model):
        return "class"
    if inference.is_conditional(model):
        raise EvaluationError(f"the model is conditioned on '{getattr(model, 'cond_stage_key', None)}'; evaluation "
                              "samples unconditional, class-conditional and text-conditional models")
    return None


def is_autoencoder(model: Any) -> bool:
    """Whether the model is a first stage (AutoencoderKL, VQModel): it encodes and decodes and has no diffusion."""
    return callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None)) \
        and not hasattr(model, "num_timesteps")


@dataclass
class SamplingSpec:
    """How samples are drawn: sampler name (one of `ldm.inference.SAMPLERS`), steps, guidance scale and eta (None:
    the sampler's own, 0 for ddim; as txt2img.py's, `ldm.inference.resolve_eta`)."""

    sampler: str = "ddim"
    steps: int = 50
    scale: float = 1.0
    eta: float | None = None

    def __post_init__(self) -> None:
        from ldm.inference import resolve_eta

        self.eta = resolve_eta(self.sampler, self.eta)

    def check_name(self, where: str = "--sampler") -> None:
        """The sampler must be one the sampling helpers know (a registered name or an alias such as "dpm")."""
        from ldm.inference import SAMPLERS
        from ldm.sampling import ALIASES

        if self.sampler not in SAMPLERS and self.sampler not in ALIASES:
            raise EvaluationError(f"{where}: unknown sampler '{self.sampler}'; expected one of {sorted(SAMPLERS)}")

    def check(self, model: Any, where: str = "--sampler") -> None:
        """Name, steps and eta the sampler accepts for this model; guidance needs a conditional model."""
        from ldm.inference import ScriptError, check_steps

        self.check_name(where)
        try:
            check_steps(self.sampler, self.steps, self.eta, model)
        except ScriptError as err:
            raise EvaluationError(f"{where} {self.sampler}: {err}") from err
        if self.scale != 1.0 and condition_kind(model) is None:
            raise EvaluationError(f"guidance scale {self.scale} needs a conditional model; this one is unconditional "
                                  "(use scale 1)")


def conditions_from_dataset(model: Any, dataset: Any, n: int, where: str = "data") -> list | None:
    """The captions or class labels of the first `n` examples of `dataset` (cycled when it is shorter), None for an
    unconditional model."""
    kind = condition_kind(model)
    if kind is None:
        return None
    key = model.cond_stage_key if kind == "text" else getattr(model.cond_stage_model, "key", model.cond_stage_key)
    length = len(dataset)
    if length == 0:
        raise EvaluationError(f"{where}: the dataset is empty; evaluation takes its {kind} conditions from it")
    out = []
    for i in range(n):
        item = dataset[i % length]
        if key not in item:
            raise EvaluationError(f"{where}: examples have no '{key}' (the model's cond_stage_key)")
        value = item[key]
        out.append(str(value) if kind == "text" else int(torch.as_tensor(value).reshape(-1)[0]))
    return out


def generate(model: Any, spec: SamplingSpec, seeds: Sequence[int], conditions: Sequence | None = None
             ) -> torch.Tensor:
    """uint8 (B, 3, H, W) samples; sample i depends only on seeds[i] and conditions[i]."""
    from ldm import inference

    kind = condition_kind(model)
    c = uc = None
    if kind is not None:
        if conditions is None or len(conditions) != len(seeds):
            raise ValueError("a conditional model needs one condition per seed")
        conditioning = inference.text_conditioning if kind == "text" else inference.class_conditioning
        c, uc = conditioning(model, list(conditions), spec.scale)
    shape = (model.channels, model.image_size, model.image_size)
    sampler = inference.make_sampler(spec.sampler, model)
    z = inference.sample_latents(sampler, spec.steps, c, uc, spec.scale, spec.eta, shape, list(seeds))
    decode = getattr(model, "decode_first_stage", None)
    images = decode(z) if decode is not None else z
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return to_uint8(images)
