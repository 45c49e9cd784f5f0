"""A small bidirectional/causal transformer with the parameter layout of x-transformers 0.x.

The LDM text-to-image models (`BERTEmbedder`, `TransformerEmbedder`) were trained with a vendored copy
of lucidrains' x-transformers. Their checkpoints store keys such as

    transformer.token_emb.weight
    transformer.pos_emb.emb.weight
    transformer.attn_layers.layers.{i}.0.weight        (pre-norm LayerNorm)
    transformer.attn_layers.layers.{i}.1.to_q.weight    (attention block, even i)
    transformer.attn_layers.layers.{i}.1.net.0.0.weight (feed-forward block, odd i; `net.0.proj` with GLU)
    transformer.norm.weight
    transformer.to_logits.weight

so every layer here is `ModuleList([norm, block, residual])` exactly as there. Only the options the
published configs rely on are implemented (pre/post norm, causal or cross attention, GELU/GEGLU
feed-forward, dropout); asking for any other x-transformers option raises a `TypeError` naming it.
Attention runs through `torch.nn.functional.scaled_dot_product_attention`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.attention import GEGLU

DEFAULT_DIM_HEAD = 64


def _split_prefixed(prefix: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split `kwargs` into (`prefix`-ed keys with the prefix removed, all other keys)."""
    picked = {k[len(prefix):]: v for k, v in kwargs.items() if k.startswith(prefix)}
    rest = {k: v for k, v in kwargs.items() if not k.startswith(prefix)}
    return picked, rest


def _reject_unknown(owner: str, allowed: set[str], given: dict[str, Any], prefix: str = "") -> None:
    """Raise a TypeError naming every option in `given` that `owner` does not implement."""
    unknown = sorted(set(given) - allowed)
    if unknown:
        names = ", ".join(prefix + name for name in unknown)
        raise TypeError(
            f"{owner}: unsupported x-transformers option(s) {names}; "
            f"this implementation supports {', '.join(prefix + a for a in sorted(allowed)) or 'none'}"
        )


class AbsolutePositionalEmbedding(nn.Module):
    """Learned absolute position embedding, one vector per position (key `emb.weight`)."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Position embeddings [1, N, dim] for a sequence `x` of shape [B, N, ...]."""
        n = x.shape[1]
        if n > self.emb.num_embeddings:
            raise ValueError(
                f"sequence length {n} exceeds max_seq_len={self.emb.num_embeddings} of the positional embedding"
            )
        return self.emb(torch.arange(n, device=x.device))[None]


class Residual(nn.Module):
    """Plain residual connection; a module so the layer layout keeps its third slot."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Return `x + residual`."""
        return x + residual


class FeedForward(nn.Module):
    """Position-wise MLP: Linear→GELU (or GEGLU, Shazeer 2020) → dropout → Linear."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP to the last dimension."""
        return self.net(x)


class Attention(nn.Module):
    """Multi-head (self or cross) attention, Vaswani et al. 2017 eq. 1, with bias-free q/k/v projections."""

    def __init__(
        self,
        dim: int,
        dim_head: int = DEFAULT_DIM_HEAD,
        heads: int = 8,
        causal: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner_dim = dim_head * heads
        self.heads = heads
        self.causal = causal
        self.dropout = dropout
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_k = nn.Linear(dim, inner_dim, bias=False)
        self.to_v = nn.Linear(dim, inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from `x` [B, N, dim] to `context` (default `x`).

        Masks are boolean [B, M] over the keys (True = attend); only the key side is masked, so
        outputs at padded query positions are unspecified.
        """
        kv = x if context is None else context
        key_mask = mask if context is None else context_mask
        b, n, _ = x.shape
        q, k, v = (
            t.reshape(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
            for t in (self.to_q(x), self.to_k(kv), self.to_v(kv))
        )
        attn_mask = None
        if key_mask is not None:
            attn_mask = key_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
        if self.causal and attn_mask is not None:
            causal = torch.ones(n, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - n)
            attn_mask = attn_mask & causal
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and attn_mask is None,
        )
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class AttentionLayers(nn.Module):
    """A stack of `depth` blocks of (self-attention, [cross-attention,] feed-forward), each wrapped as
    `ModuleList([norm, block, residual])`.

    Options prefixed `attn_` (dim_head, dropout) go to every attention block, options prefixed
    `ff_` (mult, glu, dropout) to every feed-forward block.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int = 8,
        causal: bool = False,
        cross_attend: bool = False,
        only_cross: bool = False,
        pre_norm: bool = True,
        **kwargs: Any,
    ):
        super().__init__()
        ff_kwargs, rest = _split_prefixed("ff_", kwargs)
        attn_kwargs, rest = _split_prefixed("attn_", rest)
        owner = type(self).__name__
        _reject_unknown(owner, set(), rest)
        _reject_unknown(owner, {"mult", "glu", "dropout"}, ff_kwargs, "ff_")
        _reject_unknown(owner, {"dim_head", "dropout"}, attn_kwargs, "attn_")

        self.dim = dim
        self.depth = depth
        self.pre_norm = pre_norm
        self.has_pos_emb = False  # no position-infused attention: the wrapper adds absolute positions
        if cross_attend:
            block = ("c", "f") if only_cross else ("a", "c", "f")
        else:
            block = ("a", "f")
        self.layer_types = block * depth

        self.layers = nn.ModuleList()
        for kind in self.layer_types:
            if kind == "f":
                layer: nn.Module = FeedForward(dim, **ff_kwargs)
            else:
                layer = Attention(dim, heads=heads, causal=causal and kind == "a", **attn_kwargs)
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), layer, Residual()]))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the stack on `x` [B, N, dim]; `context` [B, M, dim] feeds the cross-attention blocks."""
        last = len(self.layers) - 1
        for i, (kind, (norm, block, residual_fn)) in enumerate(zip(self.layer_types, self.layers)):
            residual = x
            if self.pre_norm:
                x = norm(x)
            if kind == "a":
                out = block(x, mask=mask)
            elif kind == "c":
                if context is None:
                    raise ValueError(f"{type(self).__name__} was built with cross_attend=True but got no context")
                out = block(x, context=context, context_mask=context_mask)
            else:
                out = block(x)
            x = residual_fn(out, residual)
            if not self.pre_norm and i != last:
                x = norm(x)
        return x


class Encoder(AttentionLayers):
    """Bidirectional attention layers."""

    def __init__(self, **kwargs: Any):
        if "causal" in kwargs:
            raise TypeError("Encoder: 'causal' cannot be set; an Encoder is always bidirectional (use Decoder)")
        super().__init__(causal=False, **kwargs)


class Decoder(AttentionLayers):
    """Causal (autoregressive) attention layers."""

    def __init__(self, **kwargs: Any):
        if "causal" in kwargs:
            raise TypeError("Decoder: 'causal' cannot be set; a Decoder is always causal")
        super().__init__(causal=True, **kwargs)


class TransformerWrapper(nn.Module):
    """Token + absolute position embedding → attention layers → final LayerNorm → logits (or embeddings)."""

    def __init__(
        self,
        *,
        num_tokens: int,
        max_seq_len: int,
        attn_layers: AttentionLayers,
        emb_dim: int | None = None,
        max_mem_len: float = 0.0,
        emb_dropout: float = 0.0,
        num_memory_tokens: int | None = None,
        tie_embedding: bool = False,
        use_pos_emb: bool = True,
    ):
        super().__init__()
        if not isinstance(attn_layers, AttentionLayers):
            raise TypeError(f"attn_layers must be an Encoder or Decoder, got {type(attn_layers).__name__}")
        if num_memory_tokens:
            raise TypeError("TransformerWrapper: num_memory_tokens is not supported by this implementation")
        dim = attn_layers.dim
        emb_dim = emb_dim or dim
        self.max_seq_len = max_seq_len
        self.max_mem_len = max_mem_len  # kept for signature compatibility; memories are not implemented
        self.num_tokens = num_tokens

        self.token_emb = nn.Embedding(num_tokens, emb_dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = AbsolutePositionalEmbedding(emb_dim, max_seq_len) if use_pos_emb else None
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.project_emb = nn.Linear(emb_dim, dim) if emb_dim != dim else nn.Identity()
        self.attn_layers = attn_layers
        self.norm = nn.LayerNorm(dim)
        self.tie_embedding = tie_embedding
        self.to_logits = None if tie_embedding else nn.Linear(dim, num_tokens)

    def forward(
        self,
        x: torch.Tensor,
        return_embeddings: bool = False,
        mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Map token ids [B, N] to logits [B, N, num_tokens], or to embeddings [B, N, dim]."""
        if x.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"TransformerWrapper expects integer token ids, got dtype {x.dtype}")
        h = self.token_emb(x)
        if self.pos_emb is not None:
            h = h + self.pos_emb(h)
        h = self.project_emb(self.emb_dropout(h))
        h = self.norm(self.attn_layers(h, mask=mask, **kwargs))
        if return_embeddings:
            return h
        if self.to_logits is None:
            return h @ self.token_emb.weight.t()
        return self.to_logits(h)
