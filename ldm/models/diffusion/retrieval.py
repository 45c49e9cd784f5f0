"""Retrieval-augmented diffusion (Blattmann et al. 2022, "Semi-Parametric Neural Image Synthesis", RDM): a
LatentDiffusion whose cross-attention context is the CLIP image embeddings of the k nearest neighbours of each
training image in a retrieval database (the image itself left out), so the model learns to draw images that fit a
set of neighbours. At sampling (`scripts/knn2img.py`) the context is a text or image query's CLIP embedding, alone
or followed by its retrieved neighbours, as latent-diffusion's knn2img; guidance's null is a zero context.

The published `configs/retrieval-augmented-diffusion/768x768.yaml` is a plain LatentDiffusion with an Identity
cond stage fed such contexts directly; this class adds what training needs: the frozen retriever (`retriever_config`,
e.g. `ldm.modules.retrieval.CLIPRetriever`; keys `retriever.*`), the database and searcher folders, `knn`, and
`nn_dropout` (the share of training contexts zeroed for classifier-free guidance). A batch that already holds the
neighbours' embeddings under `cond_stage_key` (default `nn_embeddings`, [B, k, D]) is used as it is.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from ldm.models.diffusion.ddpm import batch_images
from ldm.models.diffusion.latent_diffusion import LatentDiffusion
from ldm.models.diffusion.task_models import defer_restore, restore_deferred
from ldm.modules.encoders.conditioner import global_drop
from ldm.util import ConfigError, freeze_module, instantiate_from_config

logger = logging.getLogger(__name__)

SELF_MATCH = 1.0 - 1e-4  # a neighbour this similar to the query is the query itself


class RetrievalAugmentedDiffusion(LatentDiffusion):
    """LatentDiffusion conditioned on retrieved neighbours' CLIP embeddings by cross-attention (see module doc)."""

    def __init__(self, retriever_config: Any, database: str | os.PathLike[str] | None = None,
                 searcher: str | os.PathLike[str] | None = None, knn: int = 4, retrieval_key: str | None = None,
                 exclude_query: bool = True, nn_dropout: float = 0.1, *args: Any,
                 cond_stage_config: Any = None, cond_stage_key: str = "nn_embeddings",
                 conditioning_key: str = "crossattn", **kwargs: Any):
        if knn < 1:
            raise ConfigError(f"model.params.knn must be at least 1, got {knn}")
        if not 0.0 <= nn_dropout <= 1.0:
            raise ConfigError(f"model.params.nn_dropout must lie in [0, 1], got {nn_dropout}")
        if conditioning_key != "crossattn":
            raise ConfigError(f"model.params.conditioning_key: the neighbours are a cross-attention context; "
                              f"use crossattn, not {conditioning_key!r}")
        restore = defer_restore(kwargs)  # the checkpoint holds retriever.* too
        super().__init__(*args, cond_stage_config=cond_stage_config or {"target": "torch.nn.Identity"},
                         cond_stage_key=cond_stage_key, conditioning_key=conditioning_key, **kwargs)
        self.retriever = freeze_module(instantiate_from_config(retriever_config))
        self.database_path, self.searcher_path = database, searcher
        self.knn, self.exclude_query, self.nn_dropout = int(knn), bool(exclude_query), float(nn_dropout)
        self.retrieval_key = retrieval_key or self.first_stage_key
        self._searcher = None
        restore_deferred(self, restore)

    @property
    def searcher(self) -> Any:
        """The database's Searcher (`ldm.modules.retrieval.Searcher`), loaded on first use."""
        if self._searcher is None:
            from ldm.modules.retrieval import Searcher

            if self.database_path is None:
                raise ConfigError("model.params.database: name the retrieval database folder (scripts/train_searcher.py "
                                  "--from-data writes one), or give the batches their neighbours under "
                                  f"'{self.cond_stage_key}'")
            self._searcher = Searcher(self.database_path, self.searcher_path)
        return self._searcher

    @torch.no_grad()
    def neighbours(self, queries: torch.Tensor, k: int | None = None, exclude_query: bool | None = None
                   ) -> torch.Tensor:
        """The unit-norm CLIP embeddings [B, k, D] of the k nearest database entries of query embeddings [B, D];
        with `exclude_query` an entry that is the query itself (cosine > 1 - 1e-4) is skipped."""
        k = k or self.knn
        exclude = self.exclude_query if exclude_query is None else exclude_query
        found = self.searcher.search(queries, min(k + int(exclude), len(self.searcher)))
        nn, q = torch.from_numpy(found["nn_embeddings"]), torch.from_numpy(found["q_embeddings"])
        if exclude:
            same = torch.einsum("bkd,bd->bk", nn, q) > SELF_MATCH
            keep = torch.argsort(same.float(), dim=1, stable=True)[:, :k]  # the first k that are not the query
            nn = torch.gather(nn, 1, keep[..., None].expand(-1, -1, nn.shape[-1]))
        return nn[:, :k].to(self.device)

    def _cond_stage_input(self, batch: Mapping[str, Any], cond_key: str, x: torch.Tensor | None = None) -> Any:
        """The neighbours' embeddings: the batch's own under cond_stage_key, else retrieved for its images."""
        if cond_key in batch:
            return torch.as_tensor(batch[cond_key]).float().to(self.device)
        images = batch_images(batch, self.retrieval_key).to(self.device)
        return self.neighbours(self.retriever.encode_image(images))

    @torch.no_grad()
    def get_input(self, batch: dict, k: str, *args: Any, bs: int | None = None, **kwargs: Any) -> list:
        """[z, neighbours' embeddings [B, knn, D]] (+ LatentDiffusion's extras); in training a share nn_dropout of
        the contexts is zeroed (the null context of guidance)."""
        out = super().get_input(batch, k, *args, bs=bs, **kwargs)
        if self.training and self.nn_dropout > 0.0 and out[1] is not None:
            drop = global_drop(out[1].shape[0], self.nn_dropout).to(out[1].device)
            out[1] = torch.where(drop[:, None, None], torch.zeros_like(out[1]), out[1])
        return out

    @torch.no_grad()
    def guidance_unconditional(self, cond: Any, batch_size: int, null_label: Any = None,
                               inputs: Mapping[str, Any] | None = None) -> Any:
        """The zero context (as knn2img's uc = zeros_like(c)), everything else kept."""
        roles = self.model.roles(cond)
        return {**roles, "crossattn": torch.zeros_like(roles["crossattn"])}
