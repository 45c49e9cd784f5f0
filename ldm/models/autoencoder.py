"""First-stage autoencoders: the KL-regularised AutoencoderKL and the vector-quantised VQModel (Rombach et al.
2022, "High-Resolution Image Synthesis with Latent Diffusion Models", sec. 3; Esser et al. 2021, "Taming
Transformers"), with the original constructor parameters and state_dict keys.

Training uses Lightning 2 manual optimisation: each optimisation step is one autoencoder (generator) step and one
discriminator step, and `global_step` counts optimisation steps, as the original's two-optimizer loop under
automatic optimisation did, so `disc_start`, `max_steps` and learning-rate schedules keep their published meaning.

Gradient accumulation (`lightning.trainer.accumulate_grad_batches`, which Lightning refuses for manually optimising
modules; main.py hands it to `accumulate_grad_batches` here): both losses of each batch are divided by the count and
back-propagated, and both optimizers step once every `accumulate_grad_batches` batches (and at an epoch's last
batch), as Lightning 1's automatic accumulation did for the original. One optimisation step then sees the effective
batch `accumulate_grad_batches x batch_size`, `global_step` advances once per optimisation step (every
`accumulate_grad_batches` batches), per-step LR schedules and the EMA advance with it, and main.py's learning-rate
rule multiplies by the same count. The adaptive GAN weight and the discriminator's BatchNorm are computed per batch,
in the original too, so those two terms depend on the batch size and not only on the effective batch.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ldm.modules.diffusionmodules.model import Decoder, Encoder, decode_in_parts
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.modules.vqvae.quantize import VectorQuantizer
from ldm.util import fused_adam_kwargs, instantiate_from_config, load_state_dict

logger = logging.getLogger(__name__)

DEFAULT_LEARNING_RATE = 4.5e-6  # base_learning_rate of the published autoencoder configs


def _do_nothing() -> None:
    """Stand-in for Lightning's step-counting hooks."""


@contextmanager
def _step_not_counted(optimizer: Any) -> Iterator[None]:
    """Step `optimizer` without advancing `trainer.global_step`.

    Lightning 2 counts every manual `optimizer.step()` in global_step; the discriminator step of a batch
    must not count, or every step-based setting (disc_start, max_steps, schedules) would be halved.
    """
    hooks = ("_on_before_step", "_on_after_step")
    saved = {name: getattr(optimizer, name) for name in hooks if hasattr(optimizer, name)}
    for name in saved:
        setattr(optimizer, name, _do_nothing)
    try:
        yield
    finally:
        for name, hook in saved.items():
            setattr(optimizer, name, hook)


class _AutoencoderBase(pl.LightningModule):
    """What both autoencoders share: input handling, checkpoint loading, EMA, the two-optimizer training loop,
    validation and image logging. Subclasses define the bottleneck and how the loss is called."""

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any],
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        batch_resize_range: Sequence[int] | None = None,
        scheduler_config: Mapping[str, Any] | None = None,
        lr_g_factor: float = 1.0,
        adam_betas: Sequence[float] = (0.5, 0.9),
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        if len(adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in adam_betas):
            raise ValueError(f"model.params.adam_betas must be two numbers in [0, 1), got {list(adam_betas)!r}")
        self.adam_betas = tuple(float(b) for b in adam_betas)
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig, path="model.params.lossconfig")
        if colorize_nlabels is not None:
            if not isinstance(colorize_nlabels, int):
                raise ValueError(f"model.params.colorize_nlabels must be an int, got {colorize_nlabels!r}")
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        if batch_resize_range is not None:
            if len(batch_resize_range) != 2 or batch_resize_range[0] > batch_resize_range[1]:
                raise ValueError(f"model.params.batch_resize_range must be [low, high], got {batch_resize_range!r}")
            logger.info("%s: resizing training batches to sizes in %s", type(self).__name__, batch_resize_range)
        self.batch_resize_range = batch_resize_range
        self.scheduler_config = scheduler_config
        self.lr_g_factor = lr_g_factor
        self.use_ema = False
        self._accumulate = 1
        self._stepped = False  # whether the current batch ended with an optimisation step (the EMA follows steps)

    @property
    def accumulate_grad_batches(self) -> int:
        """Batches whose gradients are summed into one optimisation step (main.py sets it from
        lightning.trainer.accumulate_grad_batches)."""
        return self._accumulate

    @accumulate_grad_batches.setter
    def accumulate_grad_batches(self, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"lightning.trainer.accumulate_grad_batches must be a positive integer, got {value!r}")
        self._accumulate = value

    # ---- set-up helpers ----------------------------------------------------------------------------
    def _init_ema(self, decay: float) -> None:
        """Track an exponential moving average of every trainable parameter (as the original: loss included)."""
        if not 0.0 < decay < 1.0:
            raise ValueError(f"model.params.ema_decay must lie strictly between 0 and 1, got {decay}")
        self.use_ema = True
        self.model_ema = LitEma(self, decay=decay)
        logger.info("%s: keeping EMAs of %d tensors", type(self).__name__, len(list(self.model_ema.buffers())))

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = ()) -> None:
        """Load weights from a Lightning .ckpt, a bare state dict or .safetensors; keys starting with any of
        `ignore_keys` are dropped; missing and unexpected keys are logged."""
        state = load_state_dict(path)
        for key in [k for k in state if any(k.startswith(ik) for ik in ignore_keys)]:
            logger.info("Deleting key %s from state_dict", key)
            del state[key]
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as err:
            raise RuntimeError(
                f"checkpoint '{path}' (model.params.ckpt_path) does not fit the {type(self).__name__} built from "
                f"this config: {err}"
            ) from None
        logger.info(
            "Restored %s from %s with %d missing and %d unexpected keys",
            type(self).__name__, path, len(missing), len(unexpected),
        )
        if missing:
            logger.info("Missing keys: %s", missing)
        if unexpected:
            logger.info("Unexpected keys: %s", unexpected)

    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Inside, the model runs with its EMA weights (when use_ema); the training weights come back after."""
        if self.use_ema:
            self.model_ema.store(self.parameters())
            self.model_ema.copy_to(self)
            if context is not None:
                logger.info("%s: switched to EMA weights", context)
        try:
            yield
        finally:
            if self.use_ema:
                self.model_ema.restore(self.parameters())
                if context is not None:
                    logger.info("%s: restored training weights", context)

    # ---- data ------------------------------------------------------------------------------------
    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """batch[k] as channels-first float images: (B, H, W[, C]) → (B, C, H, W), contiguous.

        With batch_resize_range, training batches are resized to a random multiple of 16 in that range
        (the largest size during the first steps).
        """
        if k not in batch:
            raise KeyError(f"batch has no key '{k}' (model.params.image_key); it has {sorted(batch)}")
        x = torch.as_tensor(batch[k])
        if x.dim() == 3:
            x = x[..., None]
        if x.dim() != 4:
            raise ValueError(f"batch['{k}'] must be (B, H, W) or (B, H, W, C) images, got shape {tuple(x.shape)}")
        # the module's float dtype (float32 as the original's .float(), float64 under precision="64-true")
        x = x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format, dtype=self.dtype)
        if self.batch_resize_range is not None and self.training:
            low, high = self.batch_resize_range
            if self.global_step <= 4:
                size = high
            else:
                sizes = torch.arange(low, high + 16, 16)
                size = int(sizes[torch.randint(len(sizes), ())])
            if size != x.shape[2]:
                x = F.interpolate(x, size=size, mode="bicubic")
            x = x.detach()
        return x

    def get_last_layer(self) -> torch.Tensor:
        """Weight of the decoder's output conv, where the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight

    # ---- subclass interface ----------------------------------------------------------------------------
    def _reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(reconstruction, what the loss needs besides it)."""
        raise NotImplementedError

    def _compute_loss(
        self, x: torch.Tensor, xrec: torch.Tensor, aux: Any, optimizer_idx: int, step: int, split: str
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Call self.loss for the autoencoder (0) or discriminator (1) step."""
        raise NotImplementedError

    def _generator_parameters(self) -> list[nn.Parameter]:
        """Parameters the autoencoder optimizer trains."""
        return [
            *self.encoder.parameters(), *self.decoder.parameters(),
            *self.quant_conv.parameters(), *self.post_quant_conv.parameters(),
        ]

    def _image_log(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images derived from inputs `x` for log_images (reconstructions, samples)."""
        raise NotImplementedError

    # ---- training ----------------------------------------------------------------------------------
    def _discriminator(self) -> nn.Module:
        """The loss's discriminator; a clear error when the loss has none (e.g. torch.nn.Identity)."""
        disc = getattr(self.loss, "discriminator", None)
        if disc is None:
            raise ValueError(
                f"training {type(self).__name__} needs model.params.lossconfig to be a loss with a discriminator "
                f"(e.g. ldm.modules.losses.LPIPSWithDiscriminator); got {type(self.loss).__name__}"
            )
        return disc

    def configure_optimizers(self) -> Any:
        """Adam for the autoencoder (lr_g_factor * lr) and for the discriminator (lr), betas `adam_betas`
        ((0.5, 0.9) as the original, tuned for the GAN), with an optional per-step LambdaLR from scheduler_config."""
        lr = getattr(self, "learning_rate", None)
        if lr is None:
            logger.warning(
                "%s.learning_rate is not set (main.py sets it from model.base_learning_rate); using %g",
                type(self).__name__, DEFAULT_LEARNING_RATE,
            )
            lr = self.learning_rate = DEFAULT_LEARNING_RATE
        generator, discriminator = list(self._generator_parameters()), list(self._discriminator().parameters())
        opt_ae = torch.optim.Adam(generator, lr=self.lr_g_factor * lr, betas=self.adam_betas,
                                  **fused_adam_kwargs(generator))
        opt_disc = torch.optim.Adam(discriminator, lr=lr, betas=self.adam_betas, **fused_adam_kwargs(discriminator))
        if self.scheduler_config is None:
            return [opt_ae, opt_disc]
        schedule = instantiate_from_config(self.scheduler_config, path="model.params.scheduler_config")
        lr_lambda = getattr(schedule, "schedule", schedule)
        logger.info("%s: LambdaLR scheduling both optimizers per step", type(self).__name__)
        schedulers = [
            {"scheduler": LambdaLR(opt, lr_lambda=lr_lambda), "interval": "step", "frequency": 1}
            for opt in (opt_ae, opt_disc)
        ]
        return [opt_ae, opt_disc], schedulers

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """Accumulate the autoencoder's and then the discriminator's gradients on this batch; at the end of an
        accumulation (every `accumulate_grad_batches` batches, or the epoch's last batch) step both optimizers."""
        x = self.get_input(batch, self.image_key)
        step = self.global_step  # both losses see the same step, as in the original
        opt_ae, opt_disc = self.optimizers()
        scale = 1.0 / self.accumulate_grad_batches
        self._stepped = (batch_idx + 1) % self.accumulate_grad_batches == 0 or bool(self.trainer.is_last_batch)

        with self.toggled_optimizer(opt_ae):  # the discriminator's parameters get no gradient here
            xrec, aux = self._reconstruct(x)
            ae_loss, log_ae = self._compute_loss(x, xrec, aux, 0, step, "train")
            self.manual_backward(ae_loss * scale)
            if self._stepped:
                opt_ae.step()
                opt_ae.zero_grad(set_to_none=True)

        with self.toggled_optimizer(opt_disc):
            disc_loss, log_disc = self._compute_loss(x, xrec.detach(), aux, 1, step, "train")
            self.manual_backward(disc_loss * scale)
            if self._stepped:
                with _step_not_counted(opt_disc):
                    opt_disc.step()
                opt_disc.zero_grad(set_to_none=True)

        schedulers = self.lr_schedulers()
        if self._stepped and schedulers is not None:
            for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
                scheduler.step()

        n = x.shape[0]
        self.log("aeloss", ae_loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        self.log("discloss", disc_loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        self.log_dict({**log_ae, **log_disc}, on_step=True, on_epoch=False, batch_size=n)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Update the EMA weights after each optimisation step."""
        if self.use_ema and self._stepped:
            self.model_ema(self)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """Log the losses under val/ (and val_ema/ with EMA weights when use_ema)."""
        log = self._validation_step(batch, "")
        if self.use_ema:
            with self.ema_scope():
                self._validation_step(batch, "_ema")
        return log

    def _validation_step(self, batch: Mapping[str, Any], suffix: str) -> dict[str, torch.Tensor]:
        """Both loss terms on one validation batch, logged per epoch."""
        x = self.get_input(batch, self.image_key)
        xrec, aux = self._reconstruct(x)
        split = f"val{suffix}"
        ae_loss, log_ae = self._compute_loss(x, xrec, aux, 0, self.global_step, split)
        _, log_disc = self._compute_loss(x, xrec, aux, 1, self.global_step, split)
        n = x.shape[0]
        self.log(f"{split}/rec_loss", log_ae.pop(f"{split}/rec_loss"), prog_bar=True, on_step=False, on_epoch=True,
                 sync_dist=True, batch_size=n)
        self.log(f"{split}/aeloss", ae_loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        log = {**log_ae, **log_disc}
        self.log_dict(log, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        return log

    # ---- images ------------------------------------------------------------------------------------
    @torch.no_grad()
    def log_images(
        self, batch: Mapping[str, Any], only_inputs: bool = False, plot_ema: bool = False, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """inputs, reconstructions (and samples for KL); *_ema versions with plot_ema/log_ema when use_ema.
        Inputs with more than 3 channels (segmentations) are projected to RGB."""
        x = self.get_input(batch, self.image_key).to(self.device)
        log: dict[str, torch.Tensor] = {}
        if not only_inputs:
            log.update(self._image_log(x))
            if self.use_ema and (plot_ema or kwargs.get("log_ema", False)):
                with self.ema_scope():
                    log.update({f"{k}_ema": v for k, v in self._image_log(x).items()})
        log["inputs"] = x
        if x.shape[1] > 3:
            log = {k: self.to_rgb(v) if v.shape[1] > 3 else v for k, v in log.items()}
        return log

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Project a many-channel map (e.g. a one-hot segmentation) to RGB with a fixed random matrix, in [-1, 1]."""
        if not hasattr(self, "colorize"):
            self.register_buffer("colorize", torch.randn(3, x.shape[1], 1, 1).to(x))
        x = F.conv2d(x, weight=self.colorize.to(x))
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0


class _LargeDecodes:
    """Decoding large images within bounded memory (diffusers' names): `enable_slicing` decodes a batch one sample
    at a time, `enable_tiling` decodes latent tiles of `tile` x `tile` overlapping by `overlap`, blended
    (`ldm.modules.diffusionmodules.model.tiled_decode`)."""

    slicing: bool = False
    tile: int | None = None
    tile_overlap: int = 8

    def enable_slicing(self) -> None:
        """Decode batches one sample at a time."""
        self.slicing = True

    def disable_slicing(self) -> None:
        """Decode whole batches."""
        self.slicing = False

    def enable_tiling(self, tile: int = 32, overlap: int = 8) -> None:
        """Decode latents larger than `tile` (latent pixels) in overlapping tiles."""
        if not 0 <= overlap < tile:
            raise ValueError(f"enable_tiling: overlap {overlap} must lie in [0, tile {tile})")
        self.tile, self.tile_overlap = tile, overlap

    def disable_tiling(self) -> None:
        """Decode latents whole."""
        self.tile = None

    def _decode_parts(self, z: torch.Tensor) -> torch.Tensor:
        return decode_in_parts(lambda part: self.decoder(self.post_quant_conv(part)), z, self.slicing, self.tile,
                               self.tile_overlap)


class AutoencoderKL(_LargeDecodes, _AutoencoderBase):
    """Autoencoder with a diagonal Gaussian latent, regularised by a small KL to N(0, I) (the SD VAE).

    `ema_decay` (or `use_ema`, decay 0.9999) keeps EMA weights; `learn_logvar` trains the loss's logvar
    with the autoencoder; `adam_betas` (ours) replaces the GAN-tuned (0.5, 0.9), e.g. (0.9, 0.999) without a GAN.
    """

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any],
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        ema_decay: float | None = None,
        learn_logvar: bool = False,
        use_ema: bool = False,
        scheduler_config: Mapping[str, Any] | None = None,
        lr_g_factor: float = 1.0,
        batch_resize_range: Sequence[int] | None = None,
        adam_betas: Sequence[float] = (0.5, 0.9),
    ) -> None:
        super().__init__(ddconfig, lossconfig, image_key, colorize_nlabels, monitor, batch_resize_range,
                         scheduler_config, lr_g_factor, adam_betas)
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs model.params.ddconfig.double_z: true (mean and log-variance)")
        self.learn_logvar = learn_logvar
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim
        if ema_decay is not None or use_ema:
            self.ema_decay = 0.9999 if ema_decay is None else ema_decay
            self._init_ema(self.ema_decay)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Posterior q(z | x)."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image from latent z (sliced / tiled when enabled)."""
        return self._decode_parts(z)

    def forward(
        self, input: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """(reconstruction, posterior); decodes a posterior sample, or its mean without sample_posterior."""
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def _reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        return self(x)

    def _compute_loss(self, x, xrec, posterior, optimizer_idx, step, split):
        return self.loss(x, xrec, posterior, optimizer_idx, step, last_layer=self.get_last_layer(), split=split)

    def _generator_parameters(self) -> list[nn.Parameter]:
        params = super()._generator_parameters()
        if self.learn_logvar:
            logger.info("%s: learning the loss's logvar", type(self).__name__)
            params.append(self.loss.logvar)
        return params

    def _image_log(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        xrec, posterior = self(x)
        samples = self.decode(torch.randn_like(posterior.mean))
        return {"reconstructions": xrec, "samples": samples}


class VQModel(_AutoencoderBase):
    """Autoencoder whose latent is quantised to the nearest of `n_embed` codebook vectors of size `embed_dim`."""

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any],
        n_embed: int,
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        batch_resize_range: Sequence[int] | None = None,
        scheduler_config: Mapping[str, Any] | None = None,
        lr_g_factor: float = 1.0,
        remap: str | None = None,
        sane_index_shape: bool = False,
        use_ema: bool = False,
        adam_betas: Sequence[float] = (0.5, 0.9),
    ) -> None:
        super().__init__(ddconfig, lossconfig, image_key, colorize_nlabels, monitor, batch_resize_range,
                         scheduler_config, lr_g_factor, adam_betas)
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25, remap=remap, sane_index_shape=sane_index_shape)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        if use_ema:
            self._init_ema(0.9999)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """(quantised latent, codebook loss, (perplexity, None, indices))."""
        return self.quantize(self.encode_to_prequant(x))

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        """Latent before quantisation."""
        return self.quant_conv(self.encoder(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Image from a quantised latent."""
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b: torch.Tensor) -> torch.Tensor:
        """Image from codebook indices of shape (B, h, w)."""
        b, h, w = code_b.shape
        quant = self.quantize.get_codebook_entry(code_b.reshape(-1), shape=(b, h, w, self.embed_dim))
        return self.decode(quant)

    def forward(
        self, input: torch.Tensor, return_pred_indices: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, codebook loss[, code indices])."""
        quant, diff, (_, _, ind) = self.encode(input)
        dec = self.decode(quant)
        return (dec, diff, ind) if return_pred_indices else (dec, diff)

    def _reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        xrec, qloss, ind = self(x, return_pred_indices=True)
        return xrec, (qloss, ind)

    def _compute_loss(self, x, xrec, aux, optimizer_idx, step, split):
        qloss, ind = aux
        return self.loss(qloss, x, xrec, optimizer_idx, step, last_layer=self.get_last_layer(), split=split,
                         predicted_indices=ind)

    def _generator_parameters(self) -> list[nn.Parameter]:
        return [*super()._generator_parameters(), *self.quantize.parameters()]

    def _image_log(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"reconstructions": self(x)[0]}


class VQModelInterface(VQModel):
    """VQModel as a first stage of a latent diffusion model: encode gives the latent before quantisation,
    decode quantises it first (unless force_not_quantize)."""

    def __init__(self, embed_dim: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, embed_dim=embed_dim, **kwargs)
        self.embed_dim = embed_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent before quantisation."""
        return self.encode_to_prequant(x)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """Image from a latent, quantised first unless force_not_quantize."""
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, input: torch.Tensor, return_pred_indices: bool = False) -> tuple:
        """(reconstruction, codebook loss[, code indices]), as VQModel."""
        quant, diff, (_, _, ind) = self.quantize(self.encode_to_prequant(input))
        dec = super().decode(quant)
        return (dec, diff, ind) if return_pred_indices else (dec, diff)


class IdentityFirstStage(nn.Module):
    """A first stage that does nothing: diffusion directly in pixel space."""

    def __init__(self, *args: Any, vq_interface: bool = False, **kwargs: Any) -> None:
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x unchanged."""
        return x

    def decode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x unchanged."""
        return x

    def quantize(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """x unchanged, shaped like a quantiser's output with vq_interface."""
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x unchanged."""
        return x
