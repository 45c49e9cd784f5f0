"""The original sampler API over every sampler of the registry (`ldm.sampling.SAMPLERS`).

`Sampler(model, name).sample(S, batch_size, shape, conditioning, ...)` takes the arguments of the original
`DDIMSampler.sample` (guidance, inpainting mask, x_T, callbacks, per-sample `seeds`) and returns
(samples, intermediates) for any registered sampler; `DDIMSampler`, `PLMSSampler` and `DPMSolverSampler` are this
class with the original names, buffers and single-step methods. `make_sampler(name, model)` picks the class.
"""
from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm

from ldm.sampling.denoiser import X0Fn, model_denoiser, x0_hook
from ldm.sampling.noise import GlobalNoise, make_noise
from ldm.sampling.samplers import NoiseSource, sampler_spec
from ldm.sampling.schedule import Schedule, spacing, usable_spacing

logger = logging.getLogger(__name__)


def check_conditioning_batch(conditioning: Any, batch_size: int) -> None:
    """Warn, as the original samplers do, when the conditioning's batch differs from batch_size."""
    if conditioning is None:
        return
    first = conditioning
    if isinstance(first, dict):
        first = first[next(iter(first))]
    while isinstance(first, (list, tuple)):
        first = first[0]
    if getattr(first, "shape", None) is not None and first.shape[0] != batch_size:
        warnings.warn(f"Got {first.shape[0]} conditionings but batch_size is {batch_size}; "
                      "pass one conditioning per sample", stacklevel=3)


def noise_source(seeds: Sequence[int] | None, batch_size: int, device: torch.device) -> NoiseSource:
    """Per-sample seeded noise when `seeds` is given (one per sample), else the global generator."""
    if seeds is not None and len(seeds) != batch_size:
        raise ValueError(f"seeds must hold one seed per sample: got {len(seeds)} seeds for batch_size {batch_size}")
    return make_noise(seeds, device)


def model_x0_hook(model: Any, quantize_x0: bool = False, dynamic_threshold: float | None = None) -> X0Fn | None:
    """The x0 hook the original sampler options ask for: the first stage's codebook, then norm thresholding."""
    quantize = (lambda x0: model.first_stage_model.quantize(x0)[0]) if quantize_x0 else None
    return x0_hook(quantize=quantize, dynamic_threshold=dynamic_threshold)


class StepReporter:
    """Turns the samplers' step dicts into the original callback(i), img_callback(pred_x0, i), a tqdm bar and the
    intermediates {"x_inter": [...], "pred_x0": [...]} (in the process scale) logged every log_every_t steps."""

    def __init__(self, total: int, desc: str, schedule: Schedule, verbose: bool = True,
                 callback: Callable | None = None, img_callback: Callable | None = None, log_every_t: int = 100,
                 x_T: torch.Tensor | None = None):
        self.total, self.schedule, self.log_every_t = total, schedule, log_every_t
        self.callback, self.img_callback = callback, img_callback
        self.intermediates = {"x_inter": [x_T], "pred_x0": [x_T]}
        self.bar = tqdm(total=total, desc=desc, disable=not verbose)

    def __call__(self, step: dict[str, Any]) -> None:
        """Report one finished step."""
        i = step["i"]
        self.bar.update(1)
        if self.callback is not None:
            self.callback(i)
        if self.img_callback is not None:
            self.img_callback(step["denoised"], i)
        index = self.total - i - 1
        if index % self.log_every_t == 0 or index == self.total - 1:
            self.intermediates["x_inter"].append(self.schedule.from_ve(step["x"], step["sigma_next"]))
            self.intermediates["pred_x0"].append(step["denoised"])

    def close(self) -> None:
        """Close the progress bar."""
        self.bar.close()


class Sampler:
    """Any registered sampler behind the original `sample(S, batch_size, shape, ...)` API.

    `spacing` (default: the sampler's, see the registry, or trailing / linspace where the schedule ends in pure noise)
    and `final` choose the step array (`ldm.sampling.schedule.spacing`); `options` go to the sampler function
    (s_churn, order, ...).
    """

    name = "ddim"
    title = "DDIM"

    def __init__(self, model: Any, name: str | None = None, *, spacing: str | None = None, final: str | None = None,
                 steps_offset: int = 0, **options: Any):
        self.model = model
        self.name = name or self.name
        self.spec = sampler_spec(self.name)
        self.title = self.title if name is None else self.name
        self.spacing = spacing or usable_spacing(self.spec.spacing, model.schedule)
        self.final = final or self.spec.final
        self.steps_offset = steps_offset
        self.options = options
        self.accepts = set(inspect.signature(self.spec.fn).parameters)
        unknown = set(options) - self.accepts
        if unknown:
            raise ValueError(f"sampler '{self.name}' has no option(s) {', '.join(sorted(unknown))}")

    def register_buffer(self, name: str, attr: Any) -> None:
        """Set an attribute, moving tensors to the model's device."""
        if isinstance(attr, torch.Tensor):
            attr = attr.to(self.model.device)
        setattr(self, name, attr)

    def make_sigmas(self, S: int) -> torch.Tensor:
        """The descending levels of an S-step run."""
        return spacing(self.spacing, S, self.model.schedule, steps_offset=self.steps_offset, final=self.final)

    def sampler_options(self, eta: float | None = None, temperature: float = 1.0,
                        noise_dropout: float = 0.0) -> dict[str, Any]:
        """The sampler function's options: the constructor's, plus eta / temperature / noise_dropout where it has them
        (samplers without them ignore them, as the original PLMS and DPM-Solver samplers do)."""
        options = dict(self.options)
        for key, value, default in (("eta", eta, None), ("temperature", temperature, 1.0),
                                    ("noise_dropout", noise_dropout, 0.0)):
            if key in self.accepts and value != default:
                options[key] = value
        return options

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: Any = None,
               callback: Callable | None = None, normals_sequence: Any = None, img_callback: Callable | None = None,
               quantize_x0: bool = False, eta: float | None = None, mask: torch.Tensor | None = None,
               x0: torch.Tensor | None = None, temperature: float = 1.0, noise_dropout: float = 0.0,
               score_corrector: Any = None, corrector_kwargs: dict | None = None, verbose: bool = True,
               x_T: torch.Tensor | None = None, log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, dynamic_threshold: float | None = None,
               ucg_schedule: Sequence[float] | None = None, seeds: Sequence[int] | None = None,
               guidance_rescale: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Draw `batch_size` samples of `shape` with S steps; returns (samples, intermediates).

        `intermediates` = {"x_inter": [...], "pred_x0": [...]}: x_T, then every log_every_t steps and the last step.
        `seeds` (not in the original): one int per sample; sample i then takes its x_T and every later random draw
        from its own generator, so it is the same whether drawn alone or in a batch. `guidance_rescale` blends the
        guided output towards the conditional one's standard deviation (Lin et al. 2023, eq. 15-16).
        """
        check_conditioning_batch(conditioning, batch_size)
        self.prepare(S, eta if eta is not None else 0.0, verbose)
        size = (batch_size, *shape)
        if verbose:
            logger.info("Data shape for %s sampling is %s, eta %s", self.title, size, eta)
        return self.run(
            conditioning, size, self.make_sigmas(S), x_T=x_T, callback=callback, img_callback=img_callback,
            x0_fn=model_x0_hook(self.model, quantize_x0, dynamic_threshold), mask=mask, x0=x0,
            log_every_t=log_every_t, score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
            scale=unconditional_guidance_scale, uncond=unconditional_conditioning, ucg_schedule=ucg_schedule,
            rescale=guidance_rescale, noise=noise_source(seeds, batch_size, self.model.device),
            options=self.sampler_options(eta, temperature, noise_dropout), verbose=verbose)

    def prepare(self, S: int, eta: float, verbose: bool) -> None:
        """Hook run before sampling (DDIMSampler registers its schedule buffers here)."""

    def _scale_at(self, ucg_schedule: Sequence[float] | None, sigmas: torch.Tensor) -> dict[int, float] | None:
        """The original's ucg_schedule (one guidance scale per step) keyed by the model's timestep."""
        if ucg_schedule is None:
            return None
        if len(ucg_schedule) != len(sigmas) - 1:
            raise ValueError(f"ucg_schedule has {len(ucg_schedule)} scales for {len(sigmas) - 1} sampling steps")
        times = self.model.schedule.model_time(sigmas[:-1]).tolist()
        return {int(t): scale for t, scale in zip(times, ucg_schedule)}

    def run(self, cond: Any, size: Sequence[int], sigmas: torch.Tensor, *, x_T: torch.Tensor | None = None,
            noise: NoiseSource | None = None, callback: Callable | None = None, img_callback: Callable | None = None,
            x0_fn: X0Fn | None = None, mask: torch.Tensor | None = None, x0: torch.Tensor | None = None,
            log_every_t: int = 100, score_corrector: Any = None, corrector_kwargs: dict | None = None,
            scale: float = 1.0, uncond: Any = None, ucg_schedule: Sequence[float] | None = None, rescale: float = 0.0,
            options: dict[str, Any] | None = None, verbose: bool = True,
            desc: str | None = None) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Run the sampler over `sigmas` from x_T (pure noise of `size` by default, in the process scale)."""
        schedule = self.model.schedule
        noise = GlobalNoise(self.model.device) if noise is None else noise
        img = noise.randn(size) if x_T is None else x_T
        denoise = model_denoiser(self.model, cond, uncond, scale, rescale, x0_fn=x0_fn, score_corrector=score_corrector,
                                 corrector_kwargs=corrector_kwargs, scale_at=self._scale_at(ucg_schedule, sigmas))
        logger.info("Running %s Sampling with %d timesteps", self.title, len(sigmas) - 1)
        reporter = StepReporter(len(sigmas) - 1, desc or f"{self.title} Sampler", schedule, verbose, callback,
                                img_callback, log_every_t, img)
        try:
            x = self.spec.fn(denoise, sigmas, schedule.to_ve(img, float(sigmas[0])), noise=noise, callback=reporter,
                             mask=mask, x0=x0, **(options or {}))
        finally:
            reporter.close()
        return schedule.from_ve(x, float(sigmas[-1])), reporter.intermediates


def make_sampler(name: str, model: Any, **options: Any) -> Any:
    """The sampler object for a registered name: DDIMSampler, PLMSSampler, DPMSolverSampler ("dpm", the original
    SD 2 class) or `Sampler(model, name)` for every other sampler of the registry."""
    from ldm.models.diffusion.ddim import DDIMSampler
    from ldm.models.diffusion.dpm_solver import DPMSolverSampler
    from ldm.models.diffusion.plms import PLMSSampler

    classes = {"ddim": DDIMSampler, "plms": PLMSSampler, "dpm": DPMSolverSampler, "dpm_solver": DPMSolverSampler}
    if name in classes:
        return classes[name](model, **options)
    sampler_spec(name)
    return Sampler(model, name, **options)
