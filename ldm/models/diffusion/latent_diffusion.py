"""LatentDiffusion: DDPM in the latent space of a frozen first-stage autoencoder, with conditioning.

The conditioning is a role dict (`ldm.modules.encoders.roles`: crossattn / concat / vector) made by the cond
stage — one encoder read through `conditioning_key`, as the original, or a `GeneralConditioner` of several
embedders — plus the roles a task model adds (`task_embedders`); `DiffusionWrapper` maps it onto the UNet.
`get_input` and `get_learned_conditioning` keep their original return values. Imported by
`ldm.models.diffusion.ddpm`, where configs name it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from ldm.models.diffusion.ddpm import DDPM, batch_images
from ldm.models.diffusion.latent_logging import LatentImageLogging
from ldm.models.diffusion.patchwise import PatchwiseMixin
from ldm.modules.cached import CachedConditioning, FirstStageLatent, plain
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.encoders.conditioner import EmbedderSpec, GeneralConditioner, embed, global_drop
from ldm.modules.encoders.roles import bare_role, bare_slot, is_role_dict, take, to_legacy
from ldm.util import ConfigError, default, freeze_module, get_obj_from_str, instantiate_from_config

logger = logging.getLogger(__name__)

TEXT_KEYS = ("caption", "coordinates_bbox", "txt")
LABEL_KEYS = ("class_label", "cls")


class LatentDiffusion(PatchwiseMixin, LatentImageLogging, DDPM):
    """The latent diffusion model of Rombach et al. 2022: first stage + conditioner + denoising UNet."""

    def __init__(
        self,
        first_stage_config: Any,
        cond_stage_config: Any,
        num_timesteps_cond: int | None = None,
        cond_stage_key: str = "image",
        cond_stage_trainable: bool = False,
        concat_mode: bool = True,
        cond_stage_forward: str | None = None,
        conditioning_key: str | list[str] | None = None,
        scale_factor: float = 1.0,
        scale_by_std: bool = False,
        force_null_conditioning: bool = False,
        *args: Any,
        **kwargs: Any,
    ):
        self.force_null_conditioning = force_null_conditioning
        self.num_timesteps_cond = default(num_timesteps_cond, 1)
        self.scale_by_std = scale_by_std
        if self.num_timesteps_cond > kwargs.get("timesteps", 1000):
            raise ValueError("num_timesteps_cond cannot exceed timesteps")
        conditioning_key = _conditioning_key(conditioning_key, cond_stage_config, concat_mode, force_null_conditioning,
                                             self.num_timesteps_cond)
        ckpt_path = kwargs.pop("ckpt_path", None)
        reset_ema = kwargs.pop("reset_ema", False)
        reset_num_ema_updates = kwargs.pop("reset_num_ema_updates", False)
        ignore_keys = kwargs.pop("ignore_keys", [])
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        try:
            self.num_downs = len(first_stage_config.params.ddconfig.ch_mult) - 1
        except (AttributeError, KeyError, TypeError):
            self.num_downs = 0
        if not scale_by_std:
            self.scale_factor = scale_factor
        else:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        self.cond_stage_forward = cond_stage_forward
        self.clip_denoised = False
        self.bbox_tokenizer = None
        self.restarted_from_ckpt = ckpt_path is not None
        self._restore_from_checkpoint(ckpt_path, ignore_keys, False, reset_ema, reset_num_ema_updates)

    # ------------------------------------------------------------------ set-up
    def make_cond_schedule(self) -> None:
        """Map training timesteps onto the shortened conditioning schedule (num_timesteps_cond)."""
        cond_ids = torch.full((self.num_timesteps,), self.num_timesteps - 1, dtype=torch.long)
        ids = torch.round(torch.linspace(0, self.num_timesteps - 1, self.num_timesteps_cond)).long()
        cond_ids[: self.num_timesteps_cond] = ids
        self.register_buffer("cond_ids", cond_ids, persistent=False)

    def register_schedule(self, *args: Any, **kwargs: Any) -> None:
        super().register_schedule(*args, **kwargs)
        self.shorten_cond_schedule = self.num_timesteps_cond > 1
        if self.shorten_cond_schedule:
            self.make_cond_schedule()

    def instantiate_first_stage(self, config: Any) -> None:
        """Build the first stage, frozen and kept in eval mode."""
        self.first_stage_model = freeze_module(instantiate_from_config(config))

    def instantiate_cond_stage(self, config: Any) -> None:
        """Build the conditioner: trainable, frozen, the first stage itself, none, or a GeneralConditioner (whose
        embedders are trainable or frozen each; the model then trains it when any embedder is trainable)."""
        if _is_conditioner_config(config):
            if self.cond_stage_trainable:
                raise ConfigError("model.params.cond_stage_trainable: a GeneralConditioner cond stage trains the "
                                  "embedders marked is_trainable; leave cond_stage_trainable false")
            self.cond_stage_model = instantiate_from_config(config)
            self.cond_stage_trainable = self.cond_stage_model.is_trainable
            return
        if not self.cond_stage_trainable:
            if config == "__is_first_stage__":
                logger.info("Using first stage also as cond stage.")
                self.cond_stage_model = self.first_stage_model
            elif config == "__is_unconditional__":
                logger.info("Training %s as an unconditional model.", self.__class__.__name__)
                self.cond_stage_model = None
            else:
                self.cond_stage_model = freeze_module(instantiate_from_config(config))
        else:
            if config in ("__is_first_stage__", "__is_unconditional__"):
                raise ValueError(f"cond_stage_trainable=True cannot train the sentinel cond stage '{config}'")
            self.cond_stage_model = instantiate_from_config(config)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.model.parameters())
        if self.cond_stage_trainable:
            logger.info("%s: also optimizing conditioner params!", self.__class__.__name__)
            params += [p for p in self.cond_stage_model.parameters() if p.requires_grad]
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    @torch.no_grad()
    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        """With scale_by_std, set scale_factor = 1/std(z) once, from the first batch of a fresh run."""
        if not (self.scale_by_std and self.current_epoch == 0 and self.global_step == 0 and batch_idx == 0
                and not self.restarted_from_ckpt):
            return
        if self.scale_factor.item() != 1.0:
            logger.info("scale_factor %.5f already set (restored); not recomputed", self.scale_factor.item())
            return
        x = batch_images(batch, self.first_stage_key).to(self.device)
        z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
        self.scale_factor.copy_(1.0 / z.flatten().std())
        logger.info("setting self.scale_factor to %.5f", self.scale_factor.item())

    # ------------------------------------------------------------------ first stage and conditioning
    def get_first_stage_encoding(self, encoder_posterior: Any) -> torch.Tensor:
        """A latent from the first stage's output (sampled for a Gaussian posterior), times scale_factor."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"encoder_posterior of type '{type(encoder_posterior).__name__}' not yet implemented")
        return self.scale_factor * z

    def get_learned_conditioning(self, c: Any) -> Any:
        """Encode raw conditioning (captions, labels, images) with the cond stage."""
        if isinstance(c, CachedConditioning):  # already the frozen cond stage's output (a latent cache)
            return plain(c)
        if self.cond_stage_forward is None:
            if hasattr(self.cond_stage_model, "encode") and callable(self.cond_stage_model.encode):
                c = self.cond_stage_model.encode(c)
                if isinstance(c, DiagonalGaussianDistribution):
                    c = c.mode()
            else:
                c = self.cond_stage_model(c)
        else:
            if not hasattr(self.cond_stage_model, self.cond_stage_forward):
                raise AttributeError(f"cond_stage_forward '{self.cond_stage_forward}' is not a method of the cond stage")
            c = getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        return c

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> Any:
        """First-stage encoding of images (a FirstStageLatent from a latent cache is passed through; patch-wise with
        split_input_params, see `PatchwiseMixin`)."""
        if isinstance(x, FirstStageLatent):
            return plain(x)
        patched = self.patchwise_encode(x, self.first_stage_model.encode)
        return self.first_stage_model.encode(x) if patched is None else patched

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False, force_not_quantize: bool = False):
        """Images from (scaled) latents (patch-wise with split_input_params, see `PatchwiseMixin`)."""
        if predict_cids:
            if z.dim() == 4:
                z = torch.argmax(z.exp(), dim=1).long()
            z = self.first_stage_model.quantize.get_codebook_entry(z, shape=None)
            z = z.permute(0, 3, 1, 2).contiguous()
        z = 1.0 / self.scale_factor * z
        if force_not_quantize and hasattr(self.first_stage_model, "quantize"):
            decode = partial(self.first_stage_model.decode, force_not_quantize=True)
        else:
            decode = self.first_stage_model.decode
        patched = self.patchwise_decode(z, decode)
        return decode(z) if patched is None else patched

    @torch.no_grad()
    def get_input(self, batch: dict, k: str, return_first_stage_outputs: bool = False, force_c_encode: bool = False,
                  cond_key: str | None = None, return_original_cond: bool = False, bs: int | None = None,
                  return_x: bool = False) -> list:
        """[z, c] for a batch (+ x, reconstruction, original conditioning as asked)."""
        x = batch_images(batch, k)
        if bs is not None:
            x = x[:bs]
        x = x.to(self.device)
        z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
        c = xc = None
        if self.model.conditioning_key is not None and not self.force_null_conditioning:
            xc = self._cond_stage_input(batch, default(cond_key, self.cond_stage_key), x)
            if not self.cond_stage_trainable or force_c_encode:
                c = self.get_learned_conditioning(xc if isinstance(xc, (dict, list)) else xc.to(self.device))
            else:
                c = xc
            if bs is not None:
                c = take(c, bs)
        out = [z, c]
        if return_first_stage_outputs:
            out.extend([x, self.decode_first_stage(z)])
        if return_x:
            out.append(x)
        if return_original_cond:
            out.append(xc)
        return out

    def _cond_stage_input(self, batch: Mapping[str, Any], cond_key: str, x: torch.Tensor | None = None) -> Any:
        """What the cond stage encodes: the whole batch for a GeneralConditioner (it reads its own keys), the first
        stage's images x when cond_key is first_stage_key, captions as they are, the batch for class labels, other
        images as BCHW tensors."""
        if isinstance(self.cond_stage_model, GeneralConditioner):
            return batch
        if cond_key == self.first_stage_key:
            return batch_images(batch, cond_key).to(self.device) if x is None else x
        if cond_key in TEXT_KEYS:
            return batch[cond_key]
        if cond_key in LABEL_KEYS:
            return batch
        return batch_images(batch, cond_key).to(self.device)

    @property
    def conditioning_input_keys(self) -> tuple[str, ...]:
        """The batch keys the cond stage(s) read (none for an unconditional model)."""
        if self.model.conditioning_key is None or self.force_null_conditioning:
            return ()
        if isinstance(self.cond_stage_model, GeneralConditioner):
            return self.cond_stage_model.input_keys
        return (self.cond_stage_key,)

    @torch.no_grad()
    def get_conditioning(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The roles the cond stage(s) feed, as a role dict, for raw inputs keyed by batch key (a batch, or e.g.
        {"txt": prompts}): a GeneralConditioner embeds its keys; a single cond stage encodes cond_stage_key's
        value into the role its conditioning_key reads. Task models add their concat / vector roles in get_input."""
        if not self.conditioning_input_keys:
            return {}
        if isinstance(self.cond_stage_model, GeneralConditioner):
            return self.cond_stage_model(inputs)
        xc = self._cond_stage_input(inputs, self.cond_stage_key)
        return {bare_role(self.model.conditioning_key): self.get_learned_conditioning(xc)}

    def task_embedders(self, latent_size: Sequence[int]) -> list[tuple[EmbedderSpec, Callable[..., Any]]]:
        """The embedders a task model adds to the cond stage's roles (concat channels, a vector), each reading its
        batch key(s); run by `task_roles`. None here."""
        return []

    @torch.no_grad()
    def task_roles(self, batch: Mapping[str, Any], latent_size: Sequence[int], bs: int | None = None) -> dict[str, Any]:
        """The role dict of the task embedders for the first `bs` samples of a batch (the conditioner's loop; in
        training mode an embedder with a ucg_rate is dropped at that rate, drawn by `task_drop`)."""
        embedders = self.task_embedders(latent_size)
        keys = dict.fromkeys(key for spec, _ in embedders for key in spec.input_keys)
        return embed(embedders, {key: take(batch[key], bs) for key in keys if key in batch}, training=self.training,
                     drop=self.task_drop)

    def task_drop(self, n: int, rate: float) -> torch.Tensor:
        """Which of n samples a task embedder drops (bool [n]): from the global generator, as the conditioner."""
        return global_drop(n, rate)

    def with_task_roles(self, c: Any, batch: Mapping[str, Any], latent_size: Sequence[int],
                        bs: int | None = None) -> dict[str, Any]:
        """The original dict form ({"c_concat": [...], "c_crossattn": [...], "c_adm": ...}) of the cond stage's
        conditioning `c` (a role dict, or its output) together with the task embedders' roles."""
        roles = self.task_roles(batch, latent_size, bs)
        if c is not None:
            roles.update(c if is_role_dict(c) else {bare_role(self.model.conditioning_key): c})
        return to_legacy(roles)

    def shared_step(self, batch: dict, **kwargs: Any):
        x, c = self.get_input(batch, self.first_stage_key)
        return self(x, c)

    def forward(self, x: torch.Tensor, c: Any, *args: Any, **kwargs: Any):
        """Loss at timesteps drawn by the loss's sampler, encoding the conditioning when the cond stage trains; the
        loss sees the conditioning as a role dict."""
        t = self.diffusion_loss.sample_timesteps(x.shape[0], self.schedule, self.device)
        if self.model.conditioning_key is not None:
            if c is None:
                raise ValueError("the model is conditional but the batch gave no conditioning")
            if self.cond_stage_trainable:
                c = self.get_learned_conditioning(c)
            c = self.model.roles(c)
            if self.shorten_cond_schedule:
                tc = self.cond_ids[t].to(self.device)
                c = {role: self.q_sample(x_start=v, t=tc, noise=torch.randn_like(v.float())) if v.is_floating_point()
                     else v for role, v in c.items()}
        return self.p_losses(x, c, t, *args, **kwargs)

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: torch.Tensor | None = None):
        """The training loss of conditioned latents at timesteps t (the original argument order)."""
        return super().p_losses(x_start, t, noise=noise, cond=cond)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any, return_ids: bool = False):
        """The network output; cond is a role dict or an original form (a tensor, a list, or a dict of c_concat /
        c_crossattn / c_adm), mapped onto the UNet by the DiffusionWrapper; patch by patch with split_input_params."""
        if getattr(self, "split_input_params", None) is not None:
            if return_ids:
                raise ValueError("apply_model: return_ids is not supported with split_input_params")
            return self.patchwise_apply_model(x_noisy, t, cond)
        x_recon = self.model(x_noisy, t, cond=cond)
        if isinstance(x_recon, tuple) and not return_ids:
            return x_recon[0]
        return x_recon

    def get_unconditional_conditioning(self, batch_size: int, null_label: Any = None) -> Any:
        """Conditioning for classifier-free guidance: the null label / empty caption encoded. For a
        GeneralConditioner, `null_label` is the batch and the result its null role dict (see
        `GeneralConditioner.get_unconditional_conditioning`)."""
        if isinstance(self.cond_stage_model, GeneralConditioner):
            if not isinstance(null_label, Mapping):
                raise ValueError("a GeneralConditioner's unconditional conditioning embeds the batch's inputs: pass "
                                 "the batch (a mapping of its input keys) as null_label")
            return self.cond_stage_model.get_unconditional_conditioning(null_label)[1]
        if null_label is not None:
            xc = null_label
            if isinstance(xc, (list, tuple)) and len(xc) == 1:
                xc = list(xc) * batch_size
            elif isinstance(xc, str):
                xc = [xc] * batch_size
            return self.get_learned_conditioning(xc)
        if hasattr(self.cond_stage_model, "get_unconditional_conditioning"):
            return self.cond_stage_model.get_unconditional_conditioning(batch_size)
        if self.cond_stage_key in TEXT_KEYS:
            return self.get_learned_conditioning([""] * batch_size)
        raise NotImplementedError(
            f"no unconditional conditioning for cond_stage_key '{self.cond_stage_key}': pass null_label"
        )

    @torch.no_grad()
    def guidance_unconditional(self, cond: Any, batch_size: int, null_label: Any = None,
                               inputs: Mapping[str, Any] | None = None) -> Any:
        """Guidance's unconditional input matching `cond` (in any form): the cond stage's part replaced by its null
        (`get_unconditional_conditioning`; a GeneralConditioner's null embeds `inputs`, the batch), every other
        part (concat channels, noise levels, ...) kept."""
        if isinstance(self.cond_stage_model, GeneralConditioner):
            uc = self.get_unconditional_conditioning(batch_size, null_label if isinstance(null_label, Mapping)
                                                     else inputs)
            return {**self.model.roles(cond), **uc}
        uc = self.get_unconditional_conditioning(batch_size, null_label)
        if isinstance(uc, Mapping):  # a cond stage's raw null input (ClassEmbedder: the null class labels)
            uc = self.get_learned_conditioning(uc)
        key = self.model.conditioning_key
        if is_role_dict(cond):
            return {**cond, bare_role(key): uc}
        if isinstance(cond, Mapping):
            return {**cond, bare_slot(key): [uc]}
        return uc

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, cond: Any = None, batch_size: int = 16, return_intermediates: bool = False, x_T=None,
               verbose: bool = True, timesteps: int | None = None, quantize_denoised: bool = False, mask=None,
               x0=None, shape=None, **kwargs: Any):
        """Ancestral sampling in latent space (returns latents; see DDPM.p_sample_loop)."""
        if shape is None:
            shape = (batch_size, self.channels, self.image_size, self.image_size)
        cond = take(cond, batch_size)
        return self.p_sample_loop(shape, return_intermediates=return_intermediates, cond=cond, x_T=x_T,
                                  timesteps=timesteps, quantize_denoised=quantize_denoised, mask=mask, x0=x0,
                                  verbose=verbose, **kwargs)

    @torch.no_grad()
    def sample_log(self, cond: Any, batch_size: int, ddim: bool, ddim_steps: int, sampler: str | None = None,
                   **kwargs: Any):
        """Samples for logging: with `sampler` (a name of ldm.sampling.SAMPLERS) or DDIM (`ddim`) in ddim_steps
        steps, else ancestral over every timestep; returns (samples, intermediates)."""
        if ddim or sampler is not None:
            from ldm.models.diffusion.sampler import make_sampler

            shape = (self.channels, self.image_size, self.image_size)
            return make_sampler(sampler or "ddim", self).sample(ddim_steps, batch_size, shape, cond, verbose=False,
                                                                **kwargs)
        return self.sample(cond=cond, batch_size=batch_size, return_intermediates=True, **kwargs)


def _is_conditioner_config(config: Any) -> bool:
    """Whether a cond_stage_config builds a GeneralConditioner (or a subclass)."""
    target = config.get("target") if isinstance(config, Mapping) else None
    if not isinstance(target, str):
        return False
    obj = get_obj_from_str(target, path="model.params.cond_stage_config")
    return isinstance(obj, type) and issubclass(obj, GeneralConditioner)


def _conditioning_key(key: Any, cond_stage_config: Any, concat_mode: bool, force_null_conditioning: bool,
                      num_timesteps_cond: int) -> Any:
    """The conditioning_key the UNet is fed by: as given; for the original cond stages concat / crossattn from
    concat_mode when unset and none for '__is_unconditional__'; for a GeneralConditioner the roles its embedders
    name when unset."""
    if _is_conditioner_config(cond_stage_config):
        if num_timesteps_cond > 1:
            raise ConfigError("model.params.num_timesteps_cond > 1 (noised conditioning) needs a single cond stage, "
                              "not a GeneralConditioner")
        if key is None:
            key = GeneralConditioner.declared_roles((cond_stage_config.get("params") or {}).get("emb_models") or [])
            if key is None:
                raise ConfigError("model.params.conditioning_key: name the roles a GeneralConditioner feeds, e.g. "
                                  "[crossattn, vector] (or set role: on every embedder)")
        return key
    if key is None:
        key = "concat" if concat_mode else "crossattn"
    if cond_stage_config == "__is_unconditional__" and not force_null_conditioning:
        key = None
    return key
