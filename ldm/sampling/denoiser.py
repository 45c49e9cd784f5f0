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

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> Prediction:
        """Predict x0 and eps for x at integer timesteps t (one per batch element)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        out = self.model_fn(x, t).float()
        alpha, sigma = self.schedule.coefficients(t.cpu(), x.float())
        pred = to_prediction(self.parameterization, out, x.float(), alpha, sigma, self.schedule.sigma_data)
        if self.clip_x0 or self.x0_fn is not None:
            x0 = pred.x0.clamp(-1, 1) if self.clip_x0 else pred.x0
            x0 = self.x0_fn(x0) if self.x0_fn is not None else x0
            pred = Prediction(x0, (x.float() - alpha * x0) / sigma)
        return pred
