"""The one interface samplers see: x_t and integer timesteps in, (x0, eps) predictions out."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ldm.sampling.parameterization import Prediction, check_parameterization, to_prediction
from ldm.sampling.schedule import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Denoiser:
    """Wrap a raw model function f(x_t, t) of a given parameterization into (x0, eps) predictions.

    `clip_x0` clamps the predicted x0 to [-1, 1] (and re-derives eps from it), as the original's
    `clip_denoised` does; `x0_fn` may post-process x0 (e.g. codebook quantization) the same way.
    """

    def __init__(
        self,
        model_fn: ModelFn,
        schedule: NoiseSchedule,
        parameterization: str = "eps",
        clip_x0: bool = False,
        x0_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.model_fn = model_fn
        self.schedule = schedule
        self.parameterization = check_parameterization(parameterization)
        self.clip_x0 = clip_x0
        self.x0_fn = x0_fn

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t broadcast against `like`, on its device, in float32."""
        return self.schedule.alpha_bar(t.cpu(), like.ndim, torch.float64).to(like.device, torch.float32)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> Prediction:
        """Predict x0 and eps for x at integer timesteps t (one per batch element)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        out = self.model_fn(x, t).float()
        a = self.alpha_bar(t, x)
        pred = to_prediction(self.parameterization, out, x.float(), a)
        if self.clip_x0 or self.x0_fn is not None:
            x0 = pred.x0.clamp(-1, 1) if self.clip_x0 else pred.x0
            x0 = self.x0_fn(x0) if self.x0_fn is not None else x0
            pred = Prediction(x0, (x.float() - a.sqrt() * x0) / (1 - a).sqrt())
        return pred
