"""Conditioning encoders: class labels and text (BERT tokenizer + a small transformer).

Class names, constructor parameters and state_dict keys follow the original
`ldm.modules.encoders.modules` of latent-diffusion / Stable Diffusion v2. The `device` parameters
are kept so published configs still load, but tensors always follow the module (`.to(...)`), so the
same config runs on CPU and CUDA.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.x_transformer import Encoder, TransformerWrapper

logger = logging.getLogger(__name__)

DEFAULT_BERT_TOKENIZER = "bert-base-uncased"
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] first: padding id 0, as BERT


class AbstractEncoder(nn.Module):
    """Base class of the conditioning encoders: `encode` maps a raw condition to its embedding."""

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        """Encode a condition; implemented by subclasses."""
        raise NotImplementedError(f"{type(self).__name__} does not implement encode()")


class IdentityEncoder(AbstractEncoder):
    """An encoder that returns its input unchanged (for conditioning that is already an embedding)."""

    def encode(self, x: Any) -> Any:
        """x itself."""
        return x

    def forward(self, x: Any) -> Any:
        """x itself (so the encoder also works where a module is called, e.g. in a GeneralConditioner)."""
        return x


class ClassEmbedder(nn.Module):
    """Embeds integer class labels as a one-token sequence [B, 1, embed_dim] for cross-attention.

    In training mode each label is replaced by the null class `n_classes - 1` with probability `ucg_rate`, which
    trains the unconditional model for classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion
    Guidance", Alg. 1). `ucg_rate` defaults to 0: latent-diffusion's ClassEmbedder (cin*, models/ldm/cin256*) had no
    label dropout, and its configs train here as they did there; SD 2's class has 0.1, so a config that wants
    dropout sets it. The null class must not be a real one: with dropout on, a label n_classes - 1 in the batch is an
    error (count the null class in n_classes, as cin256-v2's 1001 for ImageNet's 1000).
    """

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class", ucg_rate: float = 0.0):
        super().__init__()
        if not 0.0 <= ucg_rate <= 1.0:
            raise ValueError(f"ClassEmbedder: ucg_rate must lie in [0, 1], got {ucg_rate}")
        self.key = key
        self.n_classes = n_classes
        self.ucg_rate = ucg_rate
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def _labels(self, batch: Mapping[str, Any] | Any, key: str) -> torch.Tensor:
        """The labels `batch[key]` (or `batch` itself when it is not a mapping) as a long tensor [B] on the
        embedding's device."""
        if isinstance(batch, Mapping):
            if key not in batch:
                raise KeyError(f"ClassEmbedder: batch has no key '{key}' (available: {sorted(batch)})")
            batch = batch[key]
        labels = torch.as_tensor(batch, device=self.embedding.weight.device).long().reshape(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.n_classes):
            raise ValueError(
                f"ClassEmbedder: labels in batch['{key}'] must lie in [0, {self.n_classes - 1}], "
                f"got range [{int(labels.min())}, {int(labels.max())}]"
            )
        return labels

    def forward(self, batch: Mapping[str, Any] | Any, key: str | None = None,
                disable_dropout: bool = False) -> torch.Tensor:
        """Embed `batch[key]` (default `self.key`), or labels given directly (as a conditioner passes its input), to
        [B, 1, embed_dim]."""
        key = key or self.key
        labels = self._labels(batch, key)
        if self.training and self.ucg_rate > 0.0 and not disable_dropout:
            null = self.n_classes - 1
            if bool((labels == null).any()):
                raise ValueError(f"ClassEmbedder: batch['{key}'] holds label {null}, the null class that ucg_rate "
                                 f"{self.ucg_rate} drops labels to; a real class must not be the null class: set "
                                 f"n_classes to the number of classes + 1 (e.g. 1001 for ImageNet) or ucg_rate: 0")
            drop = torch.rand(labels.shape, device=labels.device) < self.ucg_rate
            labels = torch.where(drop, torch.full_like(labels, self.n_classes - 1), labels)
        return self.embedding(labels[:, None])

    def get_unconditional_conditioning(
        self, bs: int, device: torch.device | str | None = None
    ) -> dict[str, torch.Tensor]:
        """A batch of `bs` null-class labels `{key: [n_classes - 1] * bs}`, on the embedding's device by default."""
        device = self.embedding.weight.device if device is None else device
        return {self.key: torch.full((bs,), self.n_classes - 1, dtype=torch.long, device=device)}


class TransformerEmbedder(AbstractEncoder):
    """A few transformer encoder layers over already-tokenized input: ids [B, T] → embeddings [B, T, n_embed]."""

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int, max_seq_len: int = 77, device: Any = "cuda"):
        super().__init__()
        del device  # config compatibility only: placement follows the module
        self.transformer = TransformerWrapper(
            num_tokens=vocab_size, max_seq_len=max_seq_len, attn_layers=Encoder(dim=n_embed, depth=n_layer)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings of `tokens` after the final LayerNorm."""
        tokens = tokens.to(self.transformer.token_emb.weight.device)
        return self.transformer(tokens, return_embeddings=True)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Same as `forward`."""
        return self(x)


def _looks_like_path(name: str) -> bool:
    """Whether `name` is meant as a filesystem path rather than a hub id like 'bert-base-uncased' or 'org/name'."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def load_bert_tokenizer(tokenizer_path: str | os.PathLike[str] = DEFAULT_BERT_TOKENIZER) -> Any:
    """Load a `BertTokenizerFast` from a local folder or a hub id, with one clear error when neither works."""
    from transformers import BertTokenizerFast

    name = os.fspath(tokenizer_path)
    hint = (
        "Point the `tokenizer_path` parameter (cond_stage_config.params.tokenizer_path in a config) at a "
        "local folder saved by `BertTokenizerFast.save_pretrained` or made with "
        "`ldm.modules.encoders.modules.train_wordpiece_tokenizer`; set HF_HUB_OFFLINE=1 to skip hub retries."
    )
    local = Path(name).expanduser()
    if local.is_dir():
        source = f"BERT tokenizer folder '{local}'"
        try:
            tokenizer = BertTokenizerFast.from_pretrained(str(local))
        except (OSError, ValueError) as err:
            raise OSError(f"{source} could not be loaded ({err}). {hint}") from err
    elif _looks_like_path(name):
        raise FileNotFoundError(f"BERT tokenizer folder '{local}' does not exist. {hint}")
    else:
        source = f"BERT tokenizer '{name}'"
        unavailable = (
            f"{source} could not be loaded: there is no local folder of that name, it is not in the Hugging Face "
            f"cache, and the hub could not provide it (offline, unreachable or no such repository)."
        )
        try:
            tokenizer = BertTokenizerFast.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise OSError(f"{unavailable} {hint}") from err
        if not _has_vocabulary(tokenizer):
            raise OSError(f"{unavailable} {hint}")
    if not _has_vocabulary(tokenizer):
        raise OSError(f"{source} holds no vocabulary (no tokenizer.json or vocab.txt). {hint}")
    return tokenizer


def _has_vocabulary(tokenizer: Any) -> bool:
    """Whether a loaded tokenizer knows words, not just its special tokens.

    transformers 5 returns a special-tokens-only tokenizer instead of failing when no vocabulary file is found.
    """
    return len(tokenizer) > len(tokenizer.all_special_ids)


class BERTTokenizer(AbstractEncoder):
    """Tokenizes text with a BERT WordPiece tokenizer to ids [B, max_length], padded with [PAD] (id 0)."""

    def __init__(
        self,
        device: Any = "cuda",
        vq_interface: bool = True,
        max_length: int = 77,
        tokenizer_path: str | os.PathLike[str] = DEFAULT_BERT_TOKENIZER,
    ):
        super().__init__()
        del device  # config compatibility only: placement follows the module
        self.tokenizer = load_bert_tokenizer(tokenizer_path)
        self.vq_interface = vq_interface
        self.max_length = max_length
        # An empty buffer so `.to(device)` tells this parameter-free module where its outputs belong.
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    @property
    def device(self) -> torch.device:
        """The device the token ids are returned on (moves with `.to(...)`)."""
        return self._device_anchor.device

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, special tokens included."""
        return len(self.tokenizer)

    def forward(self, text: str | Sequence[str]) -> torch.Tensor:
        """Token ids [B, max_length] of `text`: [CLS] ... [SEP] then [PAD], truncated to `max_length`."""
        if isinstance(text, str):
            text = [text]
        encoding = self.tokenizer(
            list(text), truncation=True, max_length=self.max_length, padding="max_length", return_tensors="pt"
        )
        return encoding["input_ids"].to(self.device)

    @torch.no_grad()
    def encode(self, text: str | Sequence[str]) -> Any:
        """Token ids; with `vq_interface` wrapped as `(None, None, [None, None, ids])` like a VQ model's encode."""
        tokens = self(text)
        if not self.vq_interface:
            return tokens
        return None, None, [None, None, tokens]

    def decode(self, text: Any) -> Any:
        """Text back from token ids [B, T] (special tokens dropped); anything else is returned unchanged."""
        if isinstance(text, torch.Tensor):
            return self.tokenizer.batch_decode(text.reshape(-1, text.shape[-1]).tolist(), skip_special_tokens=True)
        return text


class BERTEmbedder(AbstractEncoder):
    """BERT tokenizer followed by a transformer trained from scratch: text → embeddings [B, max_seq_len, n_embed]."""

    def __init__(
        self,
        n_embed: int,
        n_layer: int,
        vocab_size: int = 30522,
        max_seq_len: int = 77,
        device: Any = "cuda",
        use_tokenizer: bool = True,
        embedding_dropout: float = 0.0,
        tokenizer_path: str | os.PathLike[str] = DEFAULT_BERT_TOKENIZER,
    ):
        super().__init__()
        del device  # config compatibility only: placement follows the module
        self.use_tknz_fn = use_tokenizer
        if use_tokenizer:
            self.tknz_fn = BERTTokenizer(vq_interface=False, max_length=max_seq_len, tokenizer_path=tokenizer_path)
            if self.tknz_fn.vocab_size > vocab_size:
                raise ValueError(
                    f"BERTEmbedder: the tokenizer '{os.fspath(tokenizer_path)}' produces {self.tknz_fn.vocab_size} "
                    f"token ids but vocab_size={vocab_size}; raise vocab_size to at least {self.tknz_fn.vocab_size}"
                )
        self.transformer = TransformerWrapper(
            num_tokens=vocab_size,
            max_seq_len=max_seq_len,
            attn_layers=Encoder(dim=n_embed, depth=n_layer),
            emb_dropout=embedding_dropout,
        )

    def forward(self, text: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Embed text (or, with `use_tokenizer=False`, token ids) to [B, T, n_embed]."""
        tokens = self.tknz_fn(text) if self.use_tknz_fn else text
        tokens = tokens.to(self.transformer.token_emb.weight.device)
        return self.transformer(tokens, return_embeddings=True)

    def encode(self, text: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Same as `forward` (the conditioning used by LatentDiffusion)."""
        return self(text)


def train_wordpiece_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike[str],
    vocab_size: int = 1000,
    min_frequency: int = 1,
    overwrite: bool = False,
) -> Path:
    """Train a lowercase BERT-style WordPiece tokenizer on `texts`; save it where `BertTokenizerFast` loads it.

    Special tokens are [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4. The folder is written under a
    temporary name and renamed, so a crash never leaves a half-written tokenizer. Returns `out_dir`.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizerFast

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"tokenizer folder '{out}' already exists; pass overwrite=True to replace it")
    texts = list(texts)
    if not texts:
        raise ValueError("train_wordpiece_tokenizer: `texts` is empty; give at least one caption to learn from")

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(BERT_SPECIAL_TOKENS)
    )
    backend.train_from_iterator(texts, trainer=trainer)
    vocab = backend.get_vocab()
    ordered = sorted(vocab, key=vocab.__getitem__)

    with atomic_folder(out) as tmp:
        # vocab.txt is the classic BERT format; loading it builds BERT's normalizer/pre-tokenizer/template.
        (tmp / "vocab.txt").write_text("\n".join(ordered) + "\n", encoding="utf-8")
        BertTokenizerFast.from_pretrained(str(tmp), do_lower_case=True).save_pretrained(str(tmp))
    logger.info("saved a WordPiece tokenizer with %d tokens to %s", len(ordered), out)
    return out


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder next to `out`; on success it replaces `out`, on failure it is removed.

    The folder counterpart of `ldm.util.atomic_path`: a crash never leaves a half-written tokenizer or model folder.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


INTERPOLATION_MODES = ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area")


class SpatialRescaler(nn.Module):
    """Resizes an image condition `n_stages` times by `multiplier`, then optionally maps channels with a 1x1 conv."""

    def __init__(
        self,
        n_stages: int = 1,
        method: str = "bilinear",
        multiplier: float = 0.5,
        in_channels: int = 3,
        out_channels: int | None = None,
        bias: bool = False,
    ):
        super().__init__()
        if n_stages < 0:
            raise ValueError(f"SpatialRescaler: n_stages must be >= 0, got {n_stages}")
        if method not in INTERPOLATION_MODES:
            raise ValueError(f"SpatialRescaler: method must be one of {', '.join(INTERPOLATION_MODES)}, got {method!r}")
        self.n_stages = n_stages
        self.method = method
        self.multiplier = multiplier
        self.remap_output = out_channels is not None
        if self.remap_output:
            logger.info("SpatialRescaler: mapping %d to %d channels with a 1x1 conv", in_channels, out_channels)
            self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x resized by multiplier ** n_stages (one F.interpolate per stage), channels remapped if configured."""
        for _ in range(self.n_stages):
            x = F.interpolate(x, scale_factor=self.multiplier, mode=self.method)
        if self.remap_output:
            x = self.channel_mapper(x)
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Same as `forward`."""
        return self(x)


# The pretrained encoders live in their own files (which import this module); they are served from here lazily so
# the original config targets `ldm.modules.encoders.modules.FrozenCLIPEmbedder` etc. keep working.
_FROZEN = "ldm.modules.encoders.frozen"
_CLIP_IMAGE = "ldm.modules.encoders.clip_image"
_LAZY = {
    "FrozenCLIPEmbedder": _FROZEN,
    "FrozenOpenCLIPEmbedder": _FROZEN,
    "FrozenHFTextEmbedder": _FROZEN,
    "FrozenEncoder": _FROZEN,
    "MissingPretrainedModelError": _FROZEN,
    "write_clip_tokenizer": _FROZEN,
    "FrozenT5Embedder": "ldm.modules.encoders.t5",
    "FrozenCLIPT5Encoder": "ldm.modules.encoders.t5",
    "FrozenOpenCLIPImageEmbedder": _CLIP_IMAGE,
    "ClipImageEmbedder": _CLIP_IMAGE,
    "FrozenClipImageEmbedder": _CLIP_IMAGE,
    "FrozenCLIPTextEmbedder": _CLIP_IMAGE,
    "CLIPEmbeddingNoiseAugmentation": "ldm.modules.diffusionmodules.upscaling",
}


def __getattr__(name: str) -> Any:
    """Module attribute hook (PEP 562): the pretrained encoders and the unCLIP noise augmentation, imported from
    their own files on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
