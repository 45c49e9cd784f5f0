"""Retrieval for retrieval-augmented diffusion (Blattmann et al. 2022, RDM): a CLIP encoder of images and text, a
database of CLIP image embeddings (latent-diffusion's `.npz` files with `embedding`, `img_id`, `patch_coords`), and a
nearest-neighbour searcher over it on faiss.

faiss-cpu serves the searcher (latent-diffusion used ScaNN): its wheels are abi3 (one wheel for every CPython >= 3.10)
for Linux, macOS and Windows and need only numpy, while ScaNN ships a wheel per Python version for x86-64 Linux
only; both offer the three tiers `scripts/train_searcher.py` picks by database size, with the same inner-product
("dot_product") metric on L2-normalised embeddings: exact brute force (faiss IndexFlatIP; ScaNN score_brute_force),
product quantisation with exact re-ranking (IndexPQ inside IndexRefineFlat; ScaNN's asymmetric hashing + reorder),
and partitioning in front of that (IndexIVFPQ; ScaNN's tree + AH + reorder). A searcher is a folder holding
`index.faiss` and `searcher.json`.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ldm.modules.encoders.clip_image import CLIPImagePreprocessing, load_openai_clip, openai_arch
from ldm.util import ConfigError, atomic_path, load_state_dict

logger = logging.getLogger(__name__)

DATABASE_KEYS = ("embedding", "img_id", "patch_coords")
INDEX_FILE, INFO_FILE = "index.faiss", "searcher.json"
BRUTE_FORCE_BELOW, AH_BELOW = 20_000, 100_000  # train_searcher's tiers by pool size, as the original


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class CLIPRetriever(nn.Module):
    """A frozen CLIP model for retrieval: `encode_image` ([-1, 1] images) and `encode_text` (strings) give
    L2-normalised embeddings [B, D] in CLIP's joint space.

    `arch`: an OpenAI CLIP name ('ViT-L/14', latent-diffusion's retriever, weights from `weights` or OpenAI's cache),
    an open_clip architecture name, or an open_clip model config as a mapping (embed_dim, vision_cfg, text_cfg; e.g.
    a small one for built-in data). Without `weights` a non-OpenAI arch gets random weights drawn from `seed`, the
    same in every process, so a database embedded once matches the retriever a model builds later. `weights`: an
    OpenAI CLIP checkpoint file or a state dict of this architecture (open_clip's keys).
    """

    def __init__(self, arch: str | Mapping[str, Any] = "ViT-L/14", weights: str | os.PathLike[str] | None = None,
                 seed: int = 0, antialias: bool = False):
        super().__init__()
        self.model = self._build(arch, weights, seed)
        self.model.requires_grad_(False)
        self.preprocessing = _Preprocessing(self.model.visual.image_size, antialias)
        self.eval()

    @staticmethod
    def _build(arch: Any, weights: Any, seed: int) -> nn.Module:
        """The CLIP model (see the class docstring)."""
        import open_clip
        from open_clip.model import CLIP

        owner, key = "CLIPRetriever", "retriever_config.params.weights"
        if isinstance(arch, Mapping):
            cfg = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dict(arch).items()}
        else:
            if str(arch) in ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64") or "/" in str(arch):
                return load_openai_clip(weights or arch, True, owner, key)
            cfg = open_clip.get_model_config(openai_arch(str(arch)))
            if cfg is None:
                raise ConfigError(f"{owner}: arch '{arch}' is neither an OpenAI CLIP name nor an open_clip model "
                                  "config (name or mapping)")
        if weights is not None and not os.path.isfile(os.fspath(weights)):
            from ldm.modules.encoders.frozen import _unavailable

            raise _unavailable(f"{owner} weights", os.fspath(weights), "there is no such file",
                               f"Point `weights` ({key}) at a state dict of this CLIP, or leave it null for random "
                               "weights.")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIP(**cfg)
        if weights is not None:
            missing, unexpected = model.load_state_dict(load_state_dict(os.fspath(weights)), strict=False)
            if missing or unexpected:
                raise ConfigError(f"{owner}: '{weights}' does not fit the arch: missing {sorted(missing)[:3]}, "
                                  f"unexpected {sorted(unexpected)[:3]}")
        return model

    def train(self, mode: bool = True) -> CLIPRetriever:
        """Stay in eval mode: the retriever is frozen."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        """The joint embedding's width."""
        return int(self.model.text_projection.shape[1])

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings [B, D] of [-1, 1] images [B, 3, H, W]."""
        z = self.model.encode_image(self.preprocessing.preprocess(images.to(self.device).float()))
        return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def encode_text(self, text: str | Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings [B, D] (CLIP's tokenizer, truncated to the model's context)."""
        import open_clip

        tokens = open_clip.tokenize(text, context_length=self.model.context_length).to(self.device)
        z = self.model.encode_text(tokens)
        return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Same as `encode_image`."""
        return self.encode_image(images)


class _Preprocessing(CLIPImagePreprocessing, nn.Module):
    """CLIP's image preprocessing as the originals' encoders do it (resize, mean / std)."""

    def __init__(self, image_size: Any, antialias: bool):
        nn.Module.__init__(self)
        self._init_preprocessing(image_size, antialias)


# ----------------------------------------------------------------------------------------- the database
def save_database(folder: str | os.PathLike[str], embedding: np.ndarray, img_id: np.ndarray | None = None,
                  patch_coords: np.ndarray | None = None, name: str = "embeddings.npz") -> str:
    """Write a retrieval database file (latent-diffusion's keys) into `folder`, atomically; returns its path."""
    embedding = np.asarray(embedding, dtype=np.float32)
    n = embedding.shape[0]
    img_id = np.arange(n) if img_id is None else np.asarray(img_id)
    patch_coords = np.tile(np.array([0.0, 0.0, 1.0, 1.0], dtype=np.float32), (n, 1)) if patch_coords is None \
        else np.asarray(patch_coords, dtype=np.float32)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(os.fspath(folder), name)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, embedding=embedding, img_id=img_id, patch_coords=patch_coords)
    return path


def load_database(folder: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The `.npz` files of a database folder joined along their first axis (embedding, img_id, patch_coords)."""
    files = sorted(glob.glob(os.path.join(os.fspath(folder), "*.npz")))
    if not files:
        raise FileNotFoundError(f"no .npz files in the retrieval database folder '{os.fspath(folder)}'")
    parts = []
    for path in files:
        with np.load(path) as data:
            missing = [key for key in DATABASE_KEYS if key not in data.files]
            if missing:
                raise ValueError(f"retrieval database file '{path}' has no {', '.join(missing)} (keys: "
                                 f"{', '.join(data.files)})")
            parts.append({key: data[key] for key in DATABASE_KEYS})
    database = {key: np.concatenate([p[key] for p in parts]) for key in DATABASE_KEYS}
    logger.info("retrieval database of %d entries from %d file(s) in %s", len(database["embedding"]), len(files),
                os.fspath(folder))
    return database


# ----------------------------------------------------------------------------------------- the searcher
def train_searcher(embedding: np.ndarray, knn: int, metric: str = "dot_product", reorder_k: int | None = None,
                   dims_per_block: int = 2, num_leaves: int | None = None, num_leaves_to_search: int | None = None,
                   partitioning_trainsize: int | None = None) -> tuple[Any, dict[str, Any]]:
    """(faiss index, its settings) over the L2-normalised embeddings, the tier chosen by pool size as the original:
    brute force below 20k entries, product quantisation (`dims_per_block` dimensions per 4-bit sub-quantiser) with
    exact re-ranking of `reorder_k` (default 2 * knn) candidates below 100k, partitioned into `num_leaves`
    (default sqrt(pool)) cells searched `num_leaves_to_search` at a time (default num_leaves // 20) above."""
    import faiss

    if metric != "dot_product":
        raise ValueError(f"metric '{metric}' is not supported; the searcher scores by dot_product (cosine on unit "
                         "vectors), as latent-diffusion's")
    x = normalize(embedding)
    pool, dim = x.shape
    if knn < 1 or knn > pool:
        raise ValueError(f"knn={knn} must lie in [1, {pool}] (the database holds {pool} entries)")
    info: dict[str, Any] = {"knn": knn, "metric": metric, "pool_size": pool, "dim": dim}
    if pool < BRUTE_FORCE_BELOW:
        index = faiss.IndexFlatIP(dim)
        info["kind"] = "brute_force"
    else:
        if dim % dims_per_block:
            raise ValueError(f"dims_per_block={dims_per_block} does not divide the embedding width {dim}")
        reorder_k = reorder_k or 2 * knn
        m = dim // dims_per_block
        if pool < AH_BELOW:
            base = faiss.IndexPQ(dim, m, 4, faiss.METRIC_INNER_PRODUCT)
            info["kind"] = "asymmetric_hashing"
        else:
            num_leaves = num_leaves or int(np.sqrt(pool))
            num_leaves_to_search = num_leaves_to_search or max(num_leaves // 20, 1)
            quantizer = faiss.IndexFlatIP(dim)
            base = faiss.IndexIVFPQ(quantizer, dim, num_leaves, m, 4, faiss.METRIC_INNER_PRODUCT)
            base.nprobe = num_leaves_to_search
            info.update(kind="partitioned_asymmetric_hashing", num_leaves=num_leaves,
                        num_leaves_to_search=num_leaves_to_search)
        train = x
        if partitioning_trainsize or info["kind"] == "partitioned_asymmetric_hashing":
            size = partitioning_trainsize or pool // 10
            train = x[np.random.default_rng(0).choice(pool, size=min(size, pool), replace=False)]
        base.train(train)
        index = faiss.IndexRefineFlat(base)
        index.k_factor = max(reorder_k / knn, 1.0)
        info.update(reorder_k=reorder_k, dims_per_block=dims_per_block)
    index.add(x)
    return index, info


def save_searcher(index: Any, info: Mapping[str, Any], folder: str | os.PathLike[str]) -> None:
    """Write a searcher folder (index.faiss, searcher.json), each file atomically."""
    import faiss

    os.makedirs(folder, exist_ok=True)
    with atomic_path(os.path.join(os.fspath(folder), INDEX_FILE)) as tmp:
        faiss.write_index(index, tmp)
    with atomic_path(os.path.join(os.fspath(folder), INFO_FILE)) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(dict(info), handle, indent=1)


def load_searcher(folder: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    """(faiss index, settings) of a searcher folder written by `save_searcher`."""
    import faiss

    path = os.path.join(os.fspath(folder), INDEX_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"searcher folder '{os.fspath(folder)}' holds no {INDEX_FILE} (scripts/train_searcher.py "
                                "writes one)")
    with open(os.path.join(os.fspath(folder), INFO_FILE), encoding="utf-8") as handle:
        return faiss.read_index(path), json.load(handle)


class Searcher:
    """Nearest neighbours of query embeddings in a retrieval database (latent-diffusion's knn2img Searcher): the
    trained searcher folder when given, else (for databases under 20k entries) a brute-force index fitted on the
    fly. `search(x, k)` returns the original's dict: nn_embeddings [B, k, D] (unit norm), img_ids, patch_coords,
    queries, exec_time, nns (database indices), q_embeddings."""

    def __init__(self, database: str | os.PathLike[str] | Mapping[str, np.ndarray],
                 searcher: str | os.PathLike[str] | None = None):
        self.database = dict(database) if isinstance(database, Mapping) else load_database(database)
        if searcher is not None:
            self.index, self.info = load_searcher(searcher)
            if self.info["pool_size"] != len(self.database["embedding"]):
                raise ValueError(f"searcher '{os.fspath(searcher)}' indexes {self.info['pool_size']} entries but the "
                                 f"database holds {len(self.database['embedding'])}; train it on this database")
        elif len(self.database["embedding"]) < BRUTE_FORCE_BELOW:
            self.index, self.info = train_searcher(self.database["embedding"], 1)
        else:
            raise ValueError("a database of 20k entries or more needs a trained searcher (scripts/train_searcher.py)")
        self.embedding = normalize(self.database["embedding"])

    def __len__(self) -> int:
        return len(self.embedding)

    def search(self, x: torch.Tensor | np.ndarray, k: int) -> dict[str, Any]:
        """The k nearest database entries of each query [B, D] (or [B, L, D]: its first token) by cosine."""
        if isinstance(x, torch.Tensor):
            x = x.detach().float().cpu().numpy()
        if x.ndim == 3:
            x = x[:, 0]
        if not 1 <= k <= len(self):
            raise ValueError(f"knn={k} must lie in [1, {len(self)}] (the database size)")
        queries = normalize(x)
        start = time.time()
        _, nns = self.index.search(queries, k)
        exec_time = time.time() - start
        return {"nn_embeddings": self.embedding[nns], "img_ids": self.database["img_id"][nns],
                "patch_coords": self.database["patch_coords"][nns], "queries": x, "exec_time": exec_time, "nns": nns,
                "q_embeddings": queries}

    __call__ = search
