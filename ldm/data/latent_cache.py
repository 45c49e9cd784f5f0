"""A latent cache: a dataset encoded once into first-stage posterior moments (and frozen text-encoder outputs), stored
as tar shards in the img2dataset layout, and trained from with the shard reader's order and exact resume.

    python scripts/cache_latents.py -b configs/latent-diffusion/shapes-ldm-kl-4.yaml --out cache/shapes --limit 20000

    data:
      target: ldm.data.latent_cache.LatentCacheDataModule
      params:
        batch_size: 32
        train: {cache: cache/shapes, shuffle: 1000}

Each sample is `<key>.safetensors` (`moments`: the 2C x h x w mean and log-variance of the posterior, in bf16, fp16 or
fp32; `context`: the text encoder's output when cached), `<key>.txt` and `<key>.json`. `cache.json` beside the shards
records the shards, the autoencoder's (and text encoder's) weight hash, target and batch key, the model's
scale_factor, the latent shape and the data config the images came from (its crops and flips are frozen into the
cache). Training draws a fresh posterior sample z = mean + std * eps every data epoch, eps seeded by (seed, epoch,
shard, key), hands it to the model as a `FirstStageLatent` (passed through `encode_first_stage`) and the context as
a `CachedConditioning`; before training the data module checks the model's first stage against the recorded hash.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ldm.data.laion import WebDataModuleFromConfig
from ldm.data.shards import SampleRejected
from ldm.modules.cached import CachedConditioning, FirstStageLatent
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import ConfigError, atomic_path, dtype_from_name

logger = logging.getLogger(__name__)

CACHE_FILE = "cache.json"
NULL_CONTEXT_FILE = "null_context.safetensors"
FORMAT = "ldm-latent-cache"
CACHE_SPLIT_KEYS = ("cache", "shuffle", "shard_shuffle", "epoch_length", "repeat")


def module_hash(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes, in name order): the weights' identity."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_cache_info(cache_dir: str, key: str = "cache") -> dict[str, Any]:
    """The cache.json of a cache directory (a clear error when it is missing or not a latent cache)."""
    path = os.path.join(cache_dir, CACHE_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: '{cache_dir}' is not a latent cache (no {CACHE_FILE}); "
                          "write one with scripts/cache_latents.py")
    with open(path, encoding="utf-8") as handle:
        info = json.load(handle)
    if info.get("format") != FORMAT:
        raise ConfigError(f"{key}: {path} is not a latent cache file (format {info.get('format')!r})")
    return info


def write_cache_info(cache_dir: str, info: Mapping[str, Any]) -> None:
    """Write cache.json atomically."""
    with atomic_path(os.path.join(cache_dir, CACHE_FILE)) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"format": FORMAT, "version": 1, **info}, handle, indent=1, sort_keys=True)


def _bchw(images: Any, device: torch.device) -> torch.Tensor:
    x = torch.as_tensor(images)
    x = x[..., None] if x.ndim == 3 else x
    return x.permute(0, 3, 1, 2).to(device=device, memory_format=torch.contiguous_format).float()


@torch.no_grad()
def encode_batch(model: Any, batch: Mapping[str, Any], dtype: torch.dtype, text: bool) -> list[dict[str, torch.Tensor]]:
    """Per sample: `moments` of the model's first stage (or `latent` for a deterministic one) and with `text` the
    cond stage's `context`, cast to `dtype`, on the CPU."""
    encoded = model.encode_first_stage(_bchw(batch[model.first_stage_key], model.device))
    if isinstance(encoded, DiagonalGaussianDistribution):
        name, values = "moments", encoded.parameters
    else:
        name, values = "latent", encoded
    out = [{name: v.to(dtype).cpu().contiguous()} for v in values]
    if text:
        context = model.get_learned_conditioning(batch[model.cond_stage_key])
        for record, c in zip(out, context):
            record["context"] = c.to(dtype).cpu().contiguous()
    return out


def cache_records(model: Any, batches: Iterable[Mapping[str, Any]], dtype: torch.dtype, text: bool
                  ) -> Iterator[dict[str, Any]]:
    """Shard samples (`safetensors`, `txt`, `json`) for every sample of `batches`, keyed by `__key__` when the
    batches carry it, else by running number."""
    index = 0
    for batch in batches:
        records = encode_batch(model, batch, dtype, text)
        keys = batch.get("__key__") or [f"{index + i:09d}" for i in range(len(records))]
        captions = batch.get(getattr(model, "cond_stage_key", None) or "", None)
        metas = batch.get("json") or [{}] * len(records)
        for i, (key, tensors) in enumerate(zip(keys, records)):
            caption = captions[i] if isinstance(captions, (list, tuple)) else ""
            yield {"__key__": str(key), "safetensors": save_safetensors(tensors), "txt": str(caption),
                   "json": {**dict(metas[i]), "key": str(key)}}
        index += len(records)


def save_null_context(model: Any, cache_dir: str, dtype: torch.dtype) -> None:
    """The cond stage's output for the empty caption, for classifier-free-guidance dropout from the cache."""
    with torch.no_grad():
        context = model.get_learned_conditioning([""])[0]
    with atomic_path(os.path.join(cache_dir, NULL_CONTEXT_FILE)) as tmp, open(tmp, "wb") as handle:
        handle.write(save_safetensors({"context": context.to(dtype).cpu().contiguous()}))


def build_cache(model: Any, batches: Iterable[Mapping[str, Any]], out_dir: str, dtype: str = "bf16",
                text: bool = False, samples_per_shard: int = 1000, extra: Mapping[str, Any] | None = None
                ) -> dict[str, Any]:
    """Encode `batches` with `model` into a cache at `out_dir` (shards, null context with `text`, cache.json);
    returns the cache.json contents (`extra` entries, e.g. the data config, are recorded too)."""
    from ldm.data.shard_writer import write_shards

    torch_dtype = dtype_from_name(dtype, "cache dtype")
    count = [0]

    def counted() -> Iterator[dict[str, Any]]:
        for record in cache_records(model, batches, torch_dtype, text):
            count[0] += 1
            yield record

    with torch.no_grad():
        paths = write_shards(counted(), out_dir, samples_per_shard)
        if text:
            save_null_context(model, out_dir, torch_dtype)
    if not paths:
        raise ConfigError("the data gave no samples to cache")
    cond = {"target": type(model.cond_stage_model).__name__, "hash": module_hash(model.cond_stage_model),
            "key": model.cond_stage_key} if text else None
    info = {"shards": [os.path.basename(p) for p in paths], "num_samples": count[0], "dtype": dtype,
            "first_stage": {"target": type(model.first_stage_model).__name__, "key": model.first_stage_key,
                            "hash": module_hash(model.first_stage_model)},
            "scale_factor": float(model.scale_factor), "cond_stage": cond,
            "caption_key": getattr(model, "cond_stage_key", None) or "txt", **(extra or {})}
    write_cache_info(out_dir, info)
    return info


class LatentDecoder:
    """Raw cache sample -> example: a seeded posterior sample under `image_key` (FirstStageLatent, h x w x C),
    the cached context under `caption_key` (CachedConditioning; the null context with probability p_uncond) or the
    caption text, and the json metadata."""

    def __init__(self, image_key: str, caption_key: str, text: bool, null_context: torch.Tensor | None = None,
                 p_uncond: float = 0.0):
        if p_uncond > 0 and (not text or null_context is None):
            raise ConfigError("data.params.p_uncond needs a cache with text-encoder outputs and their null context "
                              f"({NULL_CONTEXT_FILE}); cache with --text")
        self.image_key, self.caption_key, self.text = image_key, caption_key, text
        self.null_context, self.p_uncond = null_context, float(p_uncond)

    def __call__(self, raw: dict[str, Any], seed: list[int]) -> dict[str, Any]:
        try:
            tensors = load_safetensors(raw["safetensors"])
        except Exception as err:  # noqa: BLE001 - missing or damaged member: a corrupt sample
            raise SampleRejected(f"unreadable .safetensors ({type(err).__name__}: {err})") from None
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
        if "moments" in tensors:
            z = DiagonalGaussianDistribution(tensors["moments"].float()[None]).sample(generator=generator)[0]
        elif "latent" in tensors:
            z = tensors["latent"].float()
        else:
            raise SampleRejected("the .safetensors holds neither moments nor latent")
        example: dict[str, Any] = {self.image_key: z.permute(1, 2, 0).contiguous().as_subclass(FirstStageLatent),
                                   "json": json.loads(raw.get("json", b"{}"))}
        if self.text:
            if "context" not in tensors:
                raise SampleRejected("the .safetensors has no context (text-encoder output)")
            context = tensors["context"].float()
            if self.p_uncond > 0 and float(torch.rand((), generator=generator)) < self.p_uncond:
                context = self.null_context.float()
            example[self.caption_key] = context.as_subclass(CachedConditioning)
        else:
            example[self.caption_key] = raw.get("txt", b"").decode("utf-8")
        return example


class LatentCacheDataModule(WebDataModuleFromConfig):
    """Train/validation/test loaders over latent caches written by scripts/cache_latents.py.

    Each split is `{cache: <dir>, shuffle: ..., epoch_length: ..., repeat: ...}`. `p_uncond` replaces the cached
    context by the empty caption's with that probability (classifier-free guidance training; the model's own
    ucg_training cannot edit cached embeddings). `check_model` compares the training model's first stage (and text
    encoder) with the hashes the cache recorded before the first batch.
    """

    def __init__(self, batch_size: int, train: Any = None, validation: Any = None, test: Any = None,
                 num_workers: int = 4, multinode: bool = True, seed: int = 0, p_uncond: float = 0.0,
                 check_model: bool = True):
        self.infos: dict[str, dict[str, Any]] = {}
        self.cache_dirs: dict[str, str] = {}
        splits = {}
        for split, config in (("train", train), ("validation", validation), ("test", test)):
            if config is not None:
                splits[split] = self._shards_config(split, config)
        super().__init__(tar_base=None, batch_size=batch_size, num_workers=num_workers, multinode=multinode,
                         seed=seed, max_pwatermark=None, **splits)
        self.p_uncond, self.check_model = float(p_uncond), bool(check_model)

    def _shards_config(self, split: str, config: Any) -> dict[str, Any]:
        config = dict(config)
        unknown = sorted(set(config) - set(CACHE_SPLIT_KEYS))
        if "cache" not in config or unknown:
            raise ConfigError(f"data.params.{split}: expected {{cache: <dir>, ...}} with keys from "
                              f"{', '.join(CACHE_SPLIT_KEYS)}; got {', '.join(sorted(config))}")
        cache_dir = str(config.pop("cache"))
        info = read_cache_info(cache_dir, key=f"data.params.{split}.cache")
        self.infos[split], self.cache_dirs[split] = info, cache_dir
        return {"shards": [os.path.join(cache_dir, name) for name in info["shards"]], **config}

    def decoder(self, split: str) -> LatentDecoder:
        """The LatentDecoder of a split's cache."""
        info = self.infos[split]
        text = info.get("cond_stage") is not None
        null = None
        null_path = os.path.join(self.cache_dirs[split], NULL_CONTEXT_FILE)
        if text and os.path.isfile(null_path):
            with open(null_path, "rb") as handle:
                null = load_safetensors(handle.read())["context"]
        caption_key = (info.get("cond_stage") or {}).get("key") or info.get("caption_key") or "txt"
        return LatentDecoder(info["first_stage"]["key"], caption_key, text, null,
                             self.p_uncond if split == "train" else 0.0)

    def setup(self, stage: str | None = None) -> None:
        """Check that the model being trained has the cache's first stage (and text encoder)."""
        trainer = getattr(self, "trainer", None)
        if self.check_model and trainer is not None and trainer.lightning_module is not None:
            for split in self.infos:
                check_model_matches(trainer.lightning_module, self.infos[split], self.cache_dirs[split])


def check_model_matches(model: Any, info: Mapping[str, Any], cache_dir: str) -> None:
    """ConfigError (one line) unless `model` encodes as the cache's recorded first stage and text encoder did."""
    first = info["first_stage"]
    if getattr(model, "first_stage_key", first["key"]) != first["key"]:
        raise ConfigError(f"latent cache {cache_dir} serves batch key '{first['key']}' but the model's "
                          f"first_stage_key is '{model.first_stage_key}'")
    actual = module_hash(model.first_stage_model)
    if actual != first["hash"]:
        raise ConfigError(f"latent cache {cache_dir} was encoded by another autoencoder (weights {first['hash'][:12]}, "
                          f"{info.get('source') or first['target']}) than the model's first stage (weights "
                          f"{actual[:12]}); re-run scripts/cache_latents.py or load the same first stage")
    cond = info.get("cond_stage")
    if cond is None:
        return
    if getattr(model, "cond_stage_trainable", False):
        raise ConfigError(f"latent cache {cache_dir} holds frozen text-encoder outputs but the model trains its cond "
                          "stage (cond_stage_trainable: true); cache without --text")
    if getattr(model, "cond_stage_key", cond["key"]) in (getattr(model, "ucg_training", None) or {}):
        raise ConfigError(f"model.params.ucg_training.{model.cond_stage_key} cannot drop cached embeddings; remove "
                          "it and set data.params.p_uncond instead")
    actual = module_hash(model.cond_stage_model)
    if actual != cond["hash"]:
        raise ConfigError(f"latent cache {cache_dir} was encoded by another text encoder (weights {cond['hash'][:12]}) "
                          f"than the model's cond stage (weights {actual[:12]}); re-run scripts/cache_latents.py")
