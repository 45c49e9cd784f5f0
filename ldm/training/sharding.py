"""Sharded training: PyTorch FSDP2 (`fully_shard`) through Lightning's ModelParallelStrategy, configured from YAML.

    lightning:
      trainer:
        precision: bf16-mixed
        strategy:
          target: ldm.training.sharding.FSDPStrategy
          params:
            wrap: [ldm.modules.diffusionmodules.openaimodel.TimestepEmbedSequential]   # one unit per UNet block
            shard: [model.diffusion_model]     # the trained modules (each becomes the outer unit of its blocks)
            state_dict_type: sharded           # each rank writes its shard into checkpoints/last.ckpt/ (a folder)

Why FSDP2 and not Lightning's `strategy: fsdp` (FSDP1): in this PyTorch FSDP1 refuses CPU tensors ("FSDP needs a
non-CPU accelerator device") and Lightning refuses its FSDP strategy without CUDA, while `fully_shard` runs on the
CPU with gloo, so the same code is tested on two CPU processes here and runs on GPUs there. `fully_shard` keeps
module and parameter names (parameters become DTensors sharded on dim 0), so state_dict keys stay the original ones
and `LitEma` keeps working: the strategy shards every EMA buffer like its parameter (each rank averages its shard).
Activation checkpointing: the UNet's own `use_checkpoint: true` (non-reentrant torch.utils.checkpoint), or
`activation_checkpointing: [<module class>, ...]` here. Sharded checkpoints are written to a temporary folder and
swapped in (`checkpoints/.last.ckpt.<id>.tmp`); `scripts/consolidate_checkpoint.py` turns one into a single file.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn

from ldm.util import ConfigError, dtype_from_name, get_obj_from_str

logger = logging.getLogger(__name__)

UNET_BLOCK = "ldm.modules.diffusionmodules.openaimodel.TimestepEmbedSequential"


def _classes(paths: Sequence[str] | None, key: str) -> tuple[type, ...]:
    classes = []
    for path in paths or []:
        obj = get_obj_from_str(str(path), path=key)
        if not isinstance(obj, type) or not issubclass(obj, nn.Module):
            raise ConfigError(f"{key}: '{path}' is not a torch.nn.Module class")
        classes.append(obj)
    return tuple(classes)


def _checkpoint_forward(module: nn.Module) -> None:
    """Recompute `module`'s activations in the backward pass (its names stay, unlike a checkpoint wrapper's)."""
    forward = module.forward

    @functools.wraps(forward)
    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed


def _is_dtensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


class FSDPStrategy(ModelParallelStrategy):
    """Fully sharded data parallelism over every process: `fully_shard` on each module of the `wrap` classes inside
    the `shard` modules, then on those modules; EMA buffers sharded like their parameters (module docstring)."""

    def __init__(self, wrap: Sequence[str] = (UNET_BLOCK,), shard: Sequence[str] = ("model.diffusion_model",),
                 activation_checkpointing: Sequence[str] = (), state_dict_type: str = "sharded",
                 param_dtype: str | None = None, reduce_dtype: str | None = "fp32",
                 reshard_after_forward: bool = True, **kwargs: Any):
        if state_dict_type not in ("sharded", "full"):
            raise ConfigError("lightning.trainer.strategy.params.state_dict_type: expected sharded or full, got "
                              f"{state_dict_type!r}")
        dtypes = [dtype_from_name(value, f"lightning.trainer.strategy.params.{key}", nullable=True)
                  for key, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype))]
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=state_dict_type == "sharded", **kwargs)
        self.wrap = _classes(wrap, "lightning.trainer.strategy.params.wrap")
        self.checkpointed = _classes(activation_checkpointing,
                                     "lightning.trainer.strategy.params.activation_checkpointing")
        self.shard_paths = list(shard)
        self.param_dtype, self.reduce_dtype = dtypes
        self.reshard_after_forward = bool(reshard_after_forward)

    def setup_environment(self) -> None:
        """Every process is one data-parallel rank (no tensor parallelism)."""
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        """Shard the model (instead of a configure_model hook in the LightningModule), then the usual set-up."""
        from lightning_fabric.utilities.optimizer import _optimizers_to_device

        self.accelerator.setup(trainer)
        self.shard_module(self.lightning_module)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def shard_module(self, module: nn.Module) -> None:
        """fully_shard the blocks and the `shard` modules of `module`; shard its EMA; check nothing trains unsharded."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = self.device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)
        units = 0
        for path in self.shard_paths:
            try:
                root = module.get_submodule(path)
            except AttributeError:
                raise ConfigError(f"lightning.trainer.strategy.params.shard: {type(module).__name__} has no "
                                  f"submodule '{path}'") from None
            for sub in reversed([m for m in root.modules() if m is not root]):
                if self.checkpointed and isinstance(sub, self.checkpointed):
                    _checkpoint_forward(sub)
                if self.wrap and isinstance(sub, self.wrap):
                    fully_shard(sub, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
                    units += 1
            fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
            units += 1
        loose = [n for n, p in module.named_parameters() if p.requires_grad and not _is_dtensor(p)]
        if loose:
            raise ConfigError(f"lightning.trainer.strategy.params.shard: trainable parameters outside the sharded "
                              f"modules ({', '.join(loose[:4])}{', ...' if len(loose) > 4 else ''}); add their "
                              "module to shard")
        shard_ema(module)
        logger.info("FSDP: %d units over %d processes (%s)", units, mesh.size(), ", ".join(self.shard_paths))

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """A sharded checkpoint goes to a temporary folder first and is then swapped in, so a kill never leaves a
        half-written last.ckpt/ (the full one is written atomically by the checkpoint IO)."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp = path.parent / self.broadcast(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("sharded checkpoint written")
        if self.global_rank == 0:
            swap_in(tmp, path)
        self.barrier("sharded checkpoint swapped in")


def swap_in(tmp: Path, path: Path) -> None:
    """Replace `path` (a file or folder) by `tmp`; the previous one is kept as `.<name>.<id>.prev` until the new
    one is in place (a resume puts it back if a kill came in between)."""
    previous = None
    if path.exists():
        previous = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.prev"
        os.replace(path, previous)
    os.replace(tmp, path)
    if previous is not None:
        shutil.rmtree(previous) if previous.is_dir() else previous.unlink()


@torch.no_grad()
def shard_ema(module: nn.Module) -> None:
    """Make every LitEma buffer of `module` a DTensor placed like the parameter it averages."""
    from torch.distributed.tensor import distribute_tensor

    ema, model = getattr(module, "model_ema", None), getattr(module, "model", None)
    if ema is None or model is None or not hasattr(ema, "m_name2s_name"):
        return
    for name, param in model.named_parameters():
        s_name = ema.m_name2s_name.get(name)
        if s_name is None or not _is_dtensor(param):
            continue
        buffer = ema._buffers[s_name]
        if not _is_dtensor(buffer):
            ema._buffers[s_name] = distribute_tensor(buffer.to(param.device), param.device_mesh, param.placements)
