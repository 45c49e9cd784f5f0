"""Denoising diffusion LightningModules: DDPM (pixel space) and LatentDiffusion (Rombach et al. 2022).

Constructor parameters, buffer and parameter names (`model.diffusion_model.*`, `model_ema.*`,
`first_stage_model.*`, `cond_stage_model.*`, the schedule buffers) follow the original
`ldm.models.diffusion.ddpm`, so its configs and checkpoints load unchanged. The diffusion process
itself (schedule, eps/x0/v conversions, guidance, samplers) lives in `ldm.sampling`.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from ldm.modules.ema import LitEma
from ldm.modules.encoders.roles import (  # noqa: F401 - CONDITIONING_KEYS: the original ddpm name
    CONDITIONING_KEYS,
    LEGACY_SLOTS,
    check_conditioning_key,
    to_roles,
)
from ldm.sampling import Denoiser, check_parameterization, make_noise, training_target
from ldm.sampling.denoiser import ModelFn, X0Fn, x0_hook
from ldm.sampling.loss import build_diffusion_loss, check_loss_type, elementwise_loss
from ldm.sampling.parameterization import to_prediction
from ldm.sampling.samplers.ddpm import ddpm
from ldm.sampling.schedule import build_schedule
from ldm.util import (  # noqa: F401 - disabled_train: the original ddpm name
    ConfigError,
    count_params,
    default,
    disabled_train,
    fused_adam_kwargs,
    instantiate_from_config,
    load_state_dict,
)

logger = logging.getLogger(__name__)

__conditioning_keys__ = {"concat": "c_concat", "crossattn": "c_crossattn", "adm": "y"}


def uniform_on_device(r1: float, r2: float, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Uniform samples in [r2, r1) on a device (original helper)."""
    return (r1 - r2) * torch.rand(*shape, device=device) + r2


class DDPM(pl.LightningModule):
    """Classic DDPM with Gaussian diffusion, in image space (Ho et al. 2020)."""

    def __init__(
        self,
        unet_config: Any,
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        loss_type: str = "l2",
        ckpt_path: str | None = None,
        ignore_keys: list[str] | tuple[str, ...] = (),
        load_only_unet: bool = False,
        monitor: str | None = "val/loss",
        use_ema: bool = True,
        first_stage_key: str = "image",
        image_size: int = 256,
        channels: int = 3,
        log_every_t: int = 100,
        clip_denoised: bool = True,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        given_betas: Any = None,
        original_elbo_weight: float = 0.0,
        v_posterior: float = 0.0,
        l_simple_weight: float = 1.0,
        conditioning_key: str | None = None,
        parameterization: str = "eps",
        scheduler_config: Any = None,
        use_positional_encodings: bool = False,
        learn_logvar: bool = False,
        logvar_init: float = 0.0,
        make_it_fit: bool = False,
        ucg_training: Any = None,
        reset_ema: bool = False,
        reset_num_ema_updates: bool = False,
        process_config: Any = None,
        loss_config: Any = None,
    ):
        super().__init__()
        self.parameterization = check_parameterization(parameterization)
        check_loss_type(loss_type)
        logger.info("%s: running in %s-prediction mode", self.__class__.__name__, self.parameterization)
        self.cond_stage_model = None
        self._set_data_options(first_stage_key, image_size, channels, log_every_t, clip_denoised,
                               use_positional_encodings)
        self._build_model(unet_config, conditioning_key, use_ema)
        self._set_optimization_options(scheduler_config, monitor, make_it_fit)
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        self.loss_type = loss_type
        self.register_schedule(given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                               linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s,
                               process_config=process_config)
        self._init_logvar(learn_logvar, logvar_init)
        self.diffusion_loss = build_diffusion_loss(loss_config, loss_type=loss_type, l_simple_weight=l_simple_weight,
                                                   original_elbo_weight=original_elbo_weight, learn_logvar=learn_logvar)
        self.ucg_training = dict(ucg_training or {})
        self.ucg_prng = np.random.RandomState()
        self._restore_from_checkpoint(ckpt_path, ignore_keys, load_only_unet, reset_ema, reset_num_ema_updates)

    def _set_data_options(self, first_stage_key: str, image_size: int, channels: int, log_every_t: int,
                          clip_denoised: bool, use_positional_encodings: bool) -> None:
        """What the model reads from a batch and produces, and how often sampling rows are logged."""
        if use_positional_encodings:
            raise ConfigError("model.params.use_positional_encodings: true is not supported (the original stored it "
                              "and, in LatentDiffusion.get_input, called a compute_latent_shifts it never defined); "
                              "leave it false")
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.use_positional_encodings = use_positional_encodings

    def _build_model(self, unet_config: Any, conditioning_key: Any, use_ema: bool) -> None:
        """The denoising network in its DiffusionWrapper (`model`), and its EMA (`model_ema`) when use_ema."""
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        count_params(self.model, verbose=True)
        self.use_ema = use_ema
        if self.use_ema:
            self.model_ema = LitEma(self.model)
            logger.info("Keeping EMAs of %d parameters.", len(list(self.model_ema.buffers())))

    def _set_optimization_options(self, scheduler_config: Any, monitor: str | None, make_it_fit: bool) -> None:
        """The LR scheduler config, the monitored metric and make_it_fit (checkpoint loading)."""
        self.use_scheduler = scheduler_config is not None
        if self.use_scheduler:
            self.scheduler_config = scheduler_config
        if monitor is not None:
            self.monitor = monitor
        self.make_it_fit = make_it_fit

    def _init_logvar(self, learn_logvar: bool, logvar_init: float) -> None:
        """The per-timestep log-variance of the loss: a parameter when learned, else a constant tensor."""
        self.learn_logvar = learn_logvar
        logvar = torch.full(fill_value=float(logvar_init), size=(self.num_timesteps,))
        self.logvar = nn.Parameter(logvar, requires_grad=True) if learn_logvar else logvar

    def _restore_from_checkpoint(self, ckpt_path: str | None, ignore_keys: Any, only_model: bool, reset_ema: bool,
                                 reset_num_ema_updates: bool) -> None:
        """Load ckpt_path when given; reset_ema restarts the EMA from the loaded weights, reset_num_ema_updates
        its update count."""
        if reset_ema and ckpt_path is None:
            raise ValueError("reset_ema=True needs a ckpt_path to reset from")
        if (reset_ema or reset_num_ema_updates) and not self.use_ema:
            raise ValueError("reset_ema / reset_num_ema_updates need use_ema=True")
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=only_model)
            if reset_ema:
                logger.info("Resetting the EMA to the loaded weights.")
                self.model_ema = LitEma(self.model)
        if reset_num_ema_updates:
            self.model_ema.reset_num_updates()

    # ------------------------------------------------------------------ schedule
    def register_schedule(self, given_betas: Any = None, beta_schedule: str = "linear", timesteps: int = 1000,
                          linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3,
                          process_config: Any = None) -> None:
        """Build the model's one schedule (`process_config`, default the discrete VP schedule of the beta
        parameters) and register its tensors under the original buffer names, which checkpoints hold."""
        self.schedule = build_schedule(process_config, beta_schedule=beta_schedule, timesteps=timesteps,
                                       linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s,
                                       given_betas=given_betas, v_posterior=self.v_posterior)
        self.num_timesteps = self.schedule.num_timesteps
        self.linear_start, self.linear_end = linear_start, linear_end
        buffers = self.schedule.buffers()
        for name, value in buffers.items():  # copies: loading a checkpoint must not write into the schedule
            self.register_buffer(name, value.clone())
        self.register_buffer("lvlb_weights", self._lvlb_weights(buffers), persistent=False)
        if buffers and not getattr(self, "_schedule_check_registered", False):
            self.register_load_state_dict_post_hook(_warn_on_other_schedule)
            self._schedule_check_registered = True

    def _lvlb_weights(self, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        """VLB weights of the simple loss terms (Ho et al. 2020, eq. 12), as the original computes them; ones for
        parameterizations (and processes) the original had no VLB weight for."""
        if not buffers or self.parameterization not in ("eps", "x0"):
            return torch.ones(self.num_timesteps)
        betas, alphas_cumprod = buffers["betas"], buffers["alphas_cumprod"]
        if self.parameterization == "eps":
            lvlb = betas**2 / (2 * buffers["posterior_variance"] * (1 - betas) * (1 - alphas_cumprod))
        else:
            lvlb = 0.5 * alphas_cumprod.sqrt() / (2.0 * 1 - alphas_cumprod)  # sic: the original's expression
        lvlb[0] = lvlb[1]
        if not torch.isfinite(lvlb[-1]):  # zero terminal SNR: beta_T = 1, the weight's (1 - beta) vanishes
            lvlb[-1] = lvlb[-2]
        if not torch.isfinite(lvlb).all():
            raise ValueError("the noise schedule gives non-finite VLB weights")
        return lvlb

    # ------------------------------------------------------------------ checkpoints and EMA
    @contextmanager
    def ema_scope(self, context: str | None = None):
        """Temporarily swap the EMA weights into the model."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
            if context is not None:
                logger.info("%s: switched to EMA weights", context)
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())
                if context is not None:
                    logger.info("%s: restored training weights", context)

    @torch.no_grad()
    def init_from_ckpt(self, path: str, ignore_keys: Any = (), only_model: bool = False) -> tuple[list, list]:
        """Load weights from a checkpoint, dropping keys that start with any of `ignore_keys`."""
        sd = load_state_dict(path)
        for key in list(sd):
            if any(key.startswith(prefix) for prefix in ignore_keys):
                logger.info("Deleting key %s from state_dict.", key)
                del sd[key]
        sd = self.adapt_checkpoint(sd)
        target = self.model if only_model else self
        if self.make_it_fit:
            sd = _fit_state_dict(target.state_dict(), sd)
        missing, unexpected = target.load_state_dict(sd, strict=False)
        logger.info("Restored from %s with %d missing and %d unexpected keys", path, len(missing), len(unexpected))
        if missing:
            logger.info("Missing keys: %s", missing)
        if unexpected:
            logger.info("Unexpected keys: %s", unexpected)
        return missing, unexpected

    def adapt_checkpoint(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hook for subclasses to reshape checkpoint tensors before init_from_ckpt loads them (identity here)."""
        return sd

    # ------------------------------------------------------------------ the process
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample from q(x_t | x_0) (the schedule's forward process)."""
        return self.schedule.q_sample(x_start, t, noise)

    def _alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) of the process at timesteps t, broadcast against `like`."""
        return self.schedule.coefficients(t, like)

    def _prediction(self, parameterization: str, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        return to_prediction(parameterization, output, x_t, *self._alpha_sigma(t, x_t), self.schedule.sigma_data)

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x0 from x_t and eps."""
        return self._prediction("eps", noise, x_t, t).x0

    def predict_start_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x0 from x_t and v."""
        return self._prediction("v", v, x_t, t).x0

    def predict_eps_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps from x_t and v."""
        return self._prediction("v", v, x_t, t).eps

    def get_v(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v target for clean x noised with `noise` at t."""
        return training_target("v", x, noise, *self._alpha_sigma(t, x))

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        return self.schedule.q_posterior(x_start, x_t, t)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None, return_ids: bool = False):
        """The raw network output for x_noisy at timesteps t."""
        return self.model(x_noisy, t)

    def denoiser(self, model_fn: ModelFn | None = None, clip_denoised: bool | None = None,
                 x0_fn: X0Fn | None = None) -> Denoiser:
        """denoise(x, sigma) -> x0 over this model's schedule and parameterization (`ldm.sampling.denoiser`);
        model_fn(x, t) defaults to the unconditional apply_model, clip_denoised to the model's."""
        fn = model_fn if model_fn is not None else (lambda x, t: self.apply_model(x, t, None))
        clip = default(clip_denoised, self.clip_denoised)
        if clip:
            x0_fn = x0_hook(clip=True, quantize=x0_fn)
        return Denoiser(fn, self.schedule, self.parameterization, x0_fn=x0_fn)

    def p_mean_variance(self, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool):
        """Mean and variance of p(x_{t-1} | x_t) at integer timesteps t."""
        sigma = self.schedule.t_to_sigma(t.cpu())
        x0 = self.denoiser(clip_denoised=clip_denoised)(self.schedule.to_ve(x, sigma), sigma)
        return self.q_posterior(x0.to(x.dtype), x, t)

    @torch.no_grad()
    def p_sample_loop(self, shape: tuple[int, ...], return_intermediates: bool = False, cond: Any = None,
                      x_T: torch.Tensor | None = None, timesteps: int | None = None, seeds: list[int] | None = None,
                      step_callback=None, quantize_denoised: bool = False, verbose: bool = True, **kwargs: Any):
        """Ancestral sampling from noise (or x_T) down through `timesteps` (default: all) training steps.

        Intermediate latents are kept every log_every_t steps; `seeds` gives per-sample noise
        (batch-invariant), `step_callback(t, x, x0)` sees every step, and kwargs (mask, x0,
        temperature, noise_dropout) go to `ldm.sampling.samplers.ddpm.ddpm`.
        """
        quantize = (lambda x0: self.first_stage_model.quantize(x0)[0]) if quantize_denoised else None
        denoise = self.denoiser(lambda x, t: self.apply_model(x, t, cond), x0_fn=quantize)
        noise = make_noise(seeds, self.device)
        img = noise.randn(shape) if x_T is None else x_T
        n_steps = default(timesteps, self.num_timesteps)
        sigmas = torch.cat([self.schedule.t_to_sigma(torch.arange(n_steps - 1, -1, -1)), torch.zeros(1).double()])
        intermediates = [img]
        progress = tqdm(total=n_steps, desc="Sampling t", disable=not verbose)

        def on_step(step: dict) -> None:
            progress.update(1)
            t, x = n_steps - 1 - step["i"], self.schedule.from_ve(step["x"], step["sigma_next"])
            if t % self.log_every_t == 0 or t == n_steps - 1:
                intermediates.append(x)
            if step_callback is not None:
                step_callback(t, x, step["denoised"])

        try:
            img = ddpm(denoise, sigmas, self.schedule.to_ve(img, float(sigmas[0])), v_posterior=self.v_posterior,
                       noise=noise, callback=on_step, **kwargs)
        finally:
            progress.close()
        return (img, intermediates) if return_intermediates else img

    @torch.no_grad()
    def sample(self, batch_size: int = 16, return_intermediates: bool = False, **kwargs: Any):
        """Unconditional samples of the model's image size."""
        shape = (batch_size, self.channels, self.image_size, self.image_size)
        return self.p_sample_loop(shape, return_intermediates=return_intermediates, **kwargs)

    # ------------------------------------------------------------------ training
    def get_loss(self, pred: torch.Tensor, target: torch.Tensor, mean: bool = True) -> torch.Tensor:
        """l1 or l2 distance, averaged over everything when `mean`."""
        return elementwise_loss(pred, target, self.loss_type, mean=mean)

    def p_losses(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                 cond: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss at timesteps t and its logged terms, from the model's DiffusionLoss (loss_config)."""
        return self.diffusion_loss(self, x_start, t, noise=noise, cond=cond)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        """Loss at timesteps drawn by the loss's sampler (uniform by default, as the original)."""
        t = self.diffusion_loss.sample_timesteps(x.shape[0], self.schedule, self.device)
        return self.p_losses(x, t, *args, **kwargs)

    def get_input(self, batch: dict, k: str) -> torch.Tensor:
        """The images batch[k] as a float BCHW tensor (see `batch_images`)."""
        return batch_images(batch, k)

    def shared_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Loss on a batch."""
        x = self.get_input(batch, self.first_stage_key)
        return self(x)

    def _apply_ucg_training(self, batch: dict) -> None:
        """Replace conditioning entries by their null value with probability p (SD2's ucg_training)."""
        for key, spec in self.ucg_training.items():
            p, val = spec["p"], spec.get("val")
            val = "" if val is None else val
            for i in range(len(batch[key])):
                if self.ucg_prng.choice(2, p=[1 - p, p]):
                    batch[key][i] = val

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One optimisation step's loss, with the loss terms logged."""
        self._apply_ucg_training(batch)
        loss, loss_dict = self.shared_step(batch)
        self.log_dict(loss_dict, prog_bar=True, logger=True, on_step=True, on_epoch=True, batch_size=self._bs(batch))
        self.log("global_step", float(self.global_step), prog_bar=True, logger=True, on_step=True, on_epoch=False)
        if self.use_scheduler:
            lr = self.optimizers().param_groups[0]["lr"]
            self.log("lr_abs", lr, prog_bar=True, logger=True, on_step=True, on_epoch=False)
        return loss

    def _bs(self, batch: dict) -> int:
        return len(batch[self.first_stage_key])

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Validation loss with the training weights and with the EMA weights ('_ema' suffix)."""
        _, loss_dict_no_ema = self.shared_step(batch)
        with self.ema_scope():
            _, loss_dict_ema = self.shared_step(batch)
        loss_dict_ema = {key + "_ema": value for key, value in loss_dict_ema.items()}
        kw = dict(prog_bar=False, logger=True, on_step=False, on_epoch=True, batch_size=self._bs(batch))
        self.log_dict(loss_dict_no_ema, **kw)
        self.log_dict(loss_dict_ema, **kw)

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        """Update the EMA after each optimisation step."""
        if self.use_ema:
            self.model_ema(self.model)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates: the diffusion model (and the log-variance when learned)."""
        params = list(self.model.parameters())
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    def configure_optimizers(self):
        """AdamW at self.learning_rate, with the configured LambdaLR stepped every step."""
        lr = getattr(self, "learning_rate", None)
        if lr is None:
            raise ValueError(
                f"{self.__class__.__name__}.learning_rate is not set: set model.base_learning_rate in the config "
                "(main.py scales it) or assign model.learning_rate before training"
            )
        params = self.trainable_parameters()
        opt = torch.optim.AdamW(params, lr=lr, **fused_adam_kwargs(params))
        if not self.use_scheduler:
            return opt
        scheduler = instantiate_from_config(self.scheduler_config)
        logger.info("Setting up LambdaLR scheduler...")
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": LambdaLR(opt, lr_lambda=scheduler.schedule), "interval": "step",
                                 "frequency": 1}}

    # ------------------------------------------------------------------ image logging
    @torch.no_grad()
    def log_images(self, batch: dict, N: int = 8, n_row: int = 2, sample: bool = True,
                   return_keys: list[str] | None = None, sampler: str | None = None, ddim_steps: int = 50,
                   **kwargs: Any) -> dict[str, torch.Tensor]:
        """inputs, diffusion_row (forward process), samples and denoise_row; samples are ancestral over every
        timestep, or drawn with `sampler` (a name of ldm.sampling.SAMPLERS) in `ddim_steps` steps."""
        from ldm.models.diffusion.image_logging import rows_to_grid

        x = batch_images(batch, self.first_stage_key)[:N].to(self.device)
        n_row = min(x.shape[0], n_row)
        log = {"inputs": x}
        log["diffusion_row"] = rows_to_grid(self._diffusion_row(x[:n_row]))
        if sample:
            with self.ema_scope("Plotting"):
                if sampler is None:
                    samples, denoise_row = self.sample(batch_size=N, return_intermediates=True)
                else:
                    from ldm.models.diffusion.sampler import make_sampler

                    shape = (self.channels, self.image_size, self.image_size)
                    samples, inter = make_sampler(sampler, self).sample(ddim_steps, N, shape, verbose=False)
                    denoise_row = inter["x_inter"]
            log["samples"] = samples
            log["denoise_row"] = rows_to_grid(denoise_row)
        if return_keys:
            return {key: log[key] for key in return_keys if key in log}
        return log

    def _diffusion_row(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x noised at every log_every_t-th timestep (same noise throughout)."""
        noise = torch.randn_like(x)
        row = []
        for t in range(self.num_timesteps):
            if t % self.log_every_t == 0 or t == self.num_timesteps - 1:
                ts = torch.full((x.shape[0],), t, device=self.device, dtype=torch.long)
                row.append(self.q_sample(x, ts, noise))
        return row


def batch_images(batch: Mapping[str, Any], key: str) -> torch.Tensor:
    """batch[key] as a contiguous float BCHW tensor (see `images_bchw`)."""
    if key not in batch:
        raise KeyError(f"batch has no key '{key}' (keys: {', '.join(map(str, batch))}); check first_stage_key / "
                       "cond_stage_key")
    return images_bchw(batch[key])


def images_bchw(x: Any) -> torch.Tensor:
    """Images as datasets give them, BHWC (BHW masks get a channel), as a contiguous float BCHW tensor."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if x.ndim == 3:
        x = x[..., None]
    return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()
def _warn_on_other_schedule(module: "DDPM", incompatible_keys: Any) -> None:
    """After a state dict is loaded: warn when its schedule buffers differ from the model's schedule, which is what
    training and sampling use (the buffers are kept for checkpoints only)."""
    expected = module.schedule.buffers()["alphas_cumprod"].to(module.alphas_cumprod.device)
    if not torch.allclose(module.alphas_cumprod, expected, rtol=1e-5, atol=1e-7):
        logger.warning("the checkpoint's alphas_cumprod differ from the schedule of the config (max difference %.3g); "
                       "training and sampling use the config's (model.schedule): check timesteps, linear_start, "
                       "linear_end, beta_schedule and process_config",
                       float((module.alphas_cumprod - expected).abs().max()))


def _fit_state_dict(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """make_it_fit: copy checkpoint tensors into differently shaped parameters, zero-filling new entries.

    Overlapping leading slices are copied; new input channels of the first conv start at zero, so a
    4-channel checkpoint behaves the same inside a 9-channel inpainting UNet at initialisation.
    """
    fitted = dict(sd)
    for name, param in own.items():
        if name not in sd or sd[name].shape == param.shape:
            continue
        old = sd[name]
        if old.ndim != param.ndim:
            raise ValueError(f"make_it_fit cannot fit '{name}': checkpoint {tuple(old.shape)} vs model {tuple(param.shape)}")
        new = torch.zeros_like(param)
        region = tuple(slice(0, min(a, b)) for a, b in zip(old.shape, param.shape))
        new[region] = old[region]
        logger.info("make_it_fit: %s %s -> %s", name, tuple(old.shape), tuple(param.shape))
        fitted[name] = new
    return fitted


class DiffusionWrapper(pl.LightningModule):
    """Holds the denoising network as `diffusion_model` and maps the conditioning onto its inputs — the one place
    that does: the role dict's `concat` is concatenated to x, `crossattn` is the context, `vector` is y."""

    def __init__(self, diff_model_config: Any, conditioning_key: Any):
        super().__init__()
        self.conditioning_key = check_conditioning_key(conditioning_key)
        self.sequential_cross_attn = diff_model_config.pop("sequential_crossattn", False)
        self.diffusion_model = instantiate_from_config(diff_model_config)

    def roles(self, cond: Any) -> dict[str, Any]:
        """The role dict of `cond` in any form (role dict, tensor, list, original c_concat/c_crossattn/c_adm dict),
        read through this model's conditioning_key (see `ldm.modules.encoders.roles.to_roles`)."""
        return to_roles(cond, self.conditioning_key, self.sequential_cross_attn)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: list | None = None, c_crossattn: list | None = None,
                c_adm: torch.Tensor | None = None, *, cond: Any = None) -> torch.Tensor:
        """The network's output for x at t, conditioned on `cond` (any form) or the original keyword slots."""
        legacy = {slot: value for slot, value in zip(LEGACY_SLOTS, (c_concat, c_crossattn, c_adm)) if value is not None}
        if cond is not None and legacy:
            raise ValueError("DiffusionWrapper: pass the conditioning either as cond= or as c_concat/c_crossattn/c_adm")
        roles = self.roles(cond if cond is not None else legacy or None)
        if "concat" in roles:
            x = torch.cat([x, roles["concat"]], dim=1)
        inputs = {name: roles[role] for role, name in (("crossattn", "context"), ("vector", "y")) if role in roles}
        scripted = getattr(self, "scripted_diffusion_model", None)
        if scripted is not None:  # SD 2's --torchscript: a traced UNet takes its inputs positionally
            return scripted(x, t, *inputs.values())
        return self.diffusion_model(x, t, **inputs)

    def unet_inputs(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> list[torch.Tensor]:
        """The UNet's positional inputs for x at t under `cond` (x with the concat channels, t, context, y): what a
        `scripted_diffusion_model` is traced on."""
        roles = self.roles(cond)
        if "concat" in roles:
            x = torch.cat([x, roles["concat"]], dim=1)
        return [x, t] + [roles[role] for role in ("crossattn", "vector") if role in roles]


# LatentDiffusion and the task models live in their own files to keep this one readable; they are
# re-exported here so that the original config targets (`ldm.models.diffusion.ddpm.LatentDiffusion`,
# `...ddpm.LatentInpaintDiffusion`, ...) work. Resolved on first access (PEP 562), so importing any
# of these modules first is free of import cycles.
_REEXPORTS = {
    "LatentDiffusion": "ldm.models.diffusion.latent_diffusion",
    "LatentFinetuneDiffusion": "ldm.models.diffusion.task_models",
    "LatentInpaintDiffusion": "ldm.models.diffusion.task_models",
    "LatentUpscaleDiffusion": "ldm.models.diffusion.task_models",
    "LatentDepth2ImageDiffusion": "ldm.models.diffusion.task_models",
    "LatentUpscaleFinetuneDiffusion": "ldm.models.diffusion.task_models",
    "ImageEmbeddingConditionedLatentDiffusion": "ldm.models.diffusion.unclip",
    "Layout2ImgDiffusion": "ldm.models.diffusion.layout2img",
    "RetrievalAugmentedDiffusion": "ldm.models.diffusion.retrieval",
}


def __getattr__(name: str) -> Any:
    if name in _REEXPORTS:
        import importlib

        return getattr(importlib.import_module(_REEXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
