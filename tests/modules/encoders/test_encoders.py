"""Conditioning encoders: class embedding with CFG dropout, the x-transformers layout, BERT tokenizer/embedder."""
import math
from pathlib import Path

import pytest
import torch

from ldm.modules.encoders.modules import (
    BERTEmbedder,
    BERTTokenizer,
    ClassEmbedder,
    TransformerEmbedder,
    train_wordpiece_tokenizer,
)
from ldm.modules.x_transformer import Attention, Decoder, Encoder, TransformerWrapper

REPO = Path(__file__).resolve().parents[3]

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]
CAPTIONS = [
    f"a {c} {s} on a {bg} background"
    for c in COLORS
    for s in SHAPES
    for bg in ("white", "black")
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_wordpiece_tokenizer(CAPTIONS, tmp_path_factory.mktemp("tok") / "wordpiece", vocab_size=200)


# ---------------------------------------------------------------- ClassEmbedder


def test_class_embedder_shapes_key_and_state_dict():
    torch.manual_seed(0)
    emb = ClassEmbedder(embed_dim=16, n_classes=10, key="class_label").eval()
    assert list(emb.state_dict()) == ["embedding.weight"]
    assert emb.embedding.weight.shape == (10, 16)
    labels = torch.tensor([0, 3, 7])
    out = emb({"class_label": labels})
    assert out.shape == (3, 1, 16)
    torch.testing.assert_close(out[:, 0], emb.embedding.weight[labels])
    # an explicit key overrides the configured one
    torch.testing.assert_close(emb({"other": labels}, key="other"), out)
    with pytest.raises(KeyError, match="class_label"):
        emb({"class": labels})
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        emb({"class_label": torch.tensor([10])})


def test_class_embedder_dropout_rate_in_training_only():
    emb = ClassEmbedder(embed_dim=4, n_classes=1000, ucg_rate=0.1)
    null = emb.embedding.weight[-1]
    labels = torch.arange(10_000) % 999  # never the null class itself

    def null_fraction(**kwargs) -> float:
        out = emb({"class": labels}, **kwargs)[:, 0]
        return (out == null).all(dim=-1).float().mean().item()

    torch.manual_seed(0)
    emb.train()
    assert abs(null_fraction() - 0.1) < 0.02
    assert null_fraction(disable_dropout=True) == 0.0
    emb.eval()
    assert null_fraction() == 0.0
    emb.train()
    emb.ucg_rate = 0.0
    assert null_fraction() == 0.0


def test_class_embedder_unconditional_is_null_class():
    emb = ClassEmbedder(embed_dim=8, n_classes=5, key="class_label")
    uc = emb.get_unconditional_conditioning(3)
    assert set(uc) == {"class_label"}
    assert uc["class_label"].device == emb.embedding.weight.device
    assert uc["class_label"].tolist() == [4, 4, 4]
    out = emb.train()(uc)  # the null class stays the null class under dropout too
    torch.testing.assert_close(out, emb.embedding.weight[4].expand(3, 1, 8))


@pytest.mark.parametrize("path", ["configs/latent-diffusion/cin-ldm-vq-f8.yaml", "configs/latent-diffusion/cin256-v2.yaml",
                                  "models/ldm/cin256/config.yaml"])
def test_published_class_configs_train_without_label_dropout(path):
    """latent-diffusion's ClassEmbedder had no dropout: in training mode its forward is embedding(batch[key][:, None])
    for every label, the last class included, as the published cin configs' embedder here (no ucg_rate set)."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    stage = OmegaConf.load(REPO / path).model.params.cond_stage_config
    assert "ucg_rate" not in (stage.get("params") or {})
    emb = instantiate_from_config(stage).train()
    assert emb.ucg_rate == 0.0
    labels = torch.arange(emb.n_classes).repeat(3)
    torch.manual_seed(0)
    out = emb({"class_label": labels})
    torch.testing.assert_close(out, emb.embedding(labels[:, None]), atol=0, rtol=0)  # the original's forward


def test_class_embedder_refuses_a_real_class_as_the_null_class():
    emb = ClassEmbedder(embed_dim=4, n_classes=1000, key="class_label", ucg_rate=0.1).train()
    with pytest.raises(ValueError, match=r"label 999, the null class.*n_classes to the number of classes \+ 1"):
        emb({"class_label": torch.tensor([3, 999])})
    emb.eval()  # sampling with the null class (guidance) is what it is for
    torch.testing.assert_close(emb(emb.get_unconditional_conditioning(2))[:, 0], emb.embedding.weight[[999, 999]])
    ClassEmbedder(embed_dim=4, n_classes=1000, ucg_rate=0.0).train()({"class": torch.tensor([999])})


# ---------------------------------------------------------------- x-transformers layout


def expected_keys(depth: int, prefix: str = "transformer.") -> list:
    keys = [f"{prefix}token_emb.weight", f"{prefix}pos_emb.emb.weight"]
    for i in range(depth):
        a, f = f"{prefix}attn_layers.layers.{2 * i}", f"{prefix}attn_layers.layers.{2 * i + 1}"
        keys += [f"{a}.0.weight", f"{a}.0.bias"]
        keys += [f"{a}.1.{n}.weight" for n in ("to_q", "to_k", "to_v", "to_out")] + [f"{a}.1.to_out.bias"]
        keys += [f"{f}.0.weight", f"{f}.0.bias"]
        keys += [f"{f}.1.net.0.0.weight", f"{f}.1.net.0.0.bias", f"{f}.1.net.2.weight", f"{f}.1.net.2.bias"]
    keys += [f"{prefix}norm.weight", f"{prefix}norm.bias", f"{prefix}to_logits.weight", f"{prefix}to_logits.bias"]
    return keys


def test_transformer_embedder_state_dict_layout_and_shapes():
    model = TransformerEmbedder(n_embed=32, n_layer=2, vocab_size=50, max_seq_len=12, device="cuda")
    sd = model.state_dict()
    assert sorted(sd) == sorted(expected_keys(2))
    # heads=8, dim_head=64 as in x-transformers' defaults; FF mult 4
    assert sd["transformer.attn_layers.layers.0.1.to_q.weight"].shape == (512, 32)
    assert sd["transformer.attn_layers.layers.0.1.to_out.weight"].shape == (32, 512)
    assert sd["transformer.attn_layers.layers.1.1.net.0.0.weight"].shape == (128, 32)
    assert sd["transformer.pos_emb.emb.weight"].shape == (12, 32)
    assert sd["transformer.to_logits.weight"].shape == (50, 32)
    tokens = torch.randint(0, 50, (3, 12))
    assert model(tokens).shape == (3, 12, 32)
    assert model.encode(tokens[:, :5]).shape == (3, 5, 32)
    assert model.transformer(tokens).shape == (3, 12, 50)  # logits without return_embeddings


def test_glu_feed_forward_uses_proj_key():
    layers = Encoder(dim=16, depth=1, ff_glu=True, attn_dim_head=8, heads=2)
    keys = set(layers.state_dict())
    assert "layers.1.1.net.0.proj.weight" in keys and "layers.1.1.net.2.weight" in keys
    assert layers.state_dict()["layers.1.1.net.0.proj.weight"].shape == (2 * 64, 16)
    assert layers.state_dict()["layers.0.1.to_q.weight"].shape == (16, 16)


def test_unsupported_options_are_named():
    with pytest.raises(TypeError, match="use_rezero"):
        Encoder(dim=16, depth=1, use_rezero=True)
    with pytest.raises(TypeError, match="attn_talking_heads"):
        Encoder(dim=16, depth=1, attn_talking_heads=True)
    with pytest.raises(TypeError, match="causal"):
        Encoder(dim=16, depth=1, causal=True)


def reference_attention(layer: Attention, x, causal=False):
    """softmax(q kᵀ / sqrt(d)) v written out by hand."""
    h = layer.heads
    q, k, v = layer.to_q(x), layer.to_k(x), layer.to_v(x)
    b, n, inner = q.shape
    d = inner // h
    q, k, v = (t.reshape(b, n, h, d).permute(0, 2, 1, 3) for t in (q, k, v))
    sim = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d)
    if causal:
        sim = sim.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1), v)
    return layer.to_out(out.permute(0, 2, 1, 3).reshape(b, n, inner))


def reference_encoder(layers: Encoder, x):
    """Pre-norm residual stack: x += attn(norm(x)); x += ff(norm(x))."""
    for kind, (norm, block, _) in zip(layers.layer_types, layers.layers):
        x = x + (reference_attention(block, norm(x)) if kind == "a" else block.net(norm(x)))
    return x


def test_attention_matches_reference():
    torch.manual_seed(0)
    layer = Attention(24, dim_head=8, heads=3)
    x = torch.randn(2, 7, 24)
    torch.testing.assert_close(layer(x), reference_attention(layer, x), atol=1e-5, rtol=1e-5)
    causal = Attention(24, dim_head=8, heads=3, causal=True)
    torch.testing.assert_close(causal(x), reference_attention(causal, x, causal=True), atol=1e-5, rtol=1e-5)


def test_encoder_stack_matches_reference():
    torch.manual_seed(0)
    layers = Encoder(dim=16, depth=2, heads=2, attn_dim_head=8)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(layers(x), reference_encoder(layers, x), atol=1e-5, rtol=1e-5)


def test_transformer_is_deterministic_and_sees_every_token():
    torch.manual_seed(0)
    model = TransformerEmbedder(n_embed=32, n_layer=2, vocab_size=40, max_seq_len=10).eval()
    tokens = torch.randint(1, 40, (2, 10))
    out = model(tokens)
    torch.testing.assert_close(model(tokens), out, atol=0, rtol=0)
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] % 39) + 1  # a different last token
    diff = (model(changed) - out).abs().amax(dim=-1)
    assert (diff > 1e-4).all()  # bidirectional: every position sees the change
    # the samples of a batch do not interact
    torch.testing.assert_close(model(tokens[:1]), out[:1], atol=1e-5, rtol=1e-5)


def test_decoder_is_causal():
    torch.manual_seed(0)
    model = TransformerWrapper(num_tokens=30, max_seq_len=8, attn_layers=Decoder(dim=16, depth=2, heads=2)).eval()
    tokens = torch.randint(0, 30, (2, 8))
    changed = tokens.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 30
    out, out_changed = model(tokens, return_embeddings=True), model(changed, return_embeddings=True)
    torch.testing.assert_close(out[:, :5], out_changed[:, :5], atol=1e-6, rtol=1e-6)
    assert (out[:, 5:] - out_changed[:, 5:]).abs().amax() > 1e-4


def test_sequence_longer_than_positions_is_rejected():
    model = TransformerEmbedder(n_embed=16, n_layer=1, vocab_size=10, max_seq_len=4)
    with pytest.raises(ValueError, match="max_seq_len=4"):
        model(torch.zeros(1, 5, dtype=torch.long))


# ---------------------------------------------------------------- BERT tokenizer and embedder


def test_trained_tokenizer_folder_loads_with_transformers(tokenizer_dir):
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(str(tokenizer_dir))
    assert tok.pad_token_id == 0 and tok.cls_token_id == 2 and tok.sep_token_id == 3
    ids = tok("a red circle on a white background")["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids, skip_special_tokens=True) == CAPTIONS[0]
    assert not [p for p in tokenizer_dir.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    with pytest.raises(FileExistsError, match="overwrite"):
        train_wordpiece_tokenizer(CAPTIONS, tokenizer_dir)


def test_bert_tokenizer_ids(tokenizer_dir):
    tok = BERTTokenizer(device="cuda", tokenizer_path=tokenizer_dir)  # device is ignored: no GPU needed
    text = ["a red circle on a white background", "a blue star on a black background", "A RED star"]
    ids = tok(text)
    assert ids.shape == (3, 77) and ids.dtype == torch.long
    assert (ids[:, 0] == 2).all()
    lengths = (ids != 0).sum(dim=1)
    assert lengths.tolist()[:2] == [len(tok.tokenizer.tokenize(t)) + 2 for t in text[:2]]
    assert (ids[0, lengths[0]:] == 0).all() and ids[0, lengths[0] - 1] == 3  # [SEP] then [PAD]=0
    # a word maps to the same id(s) wherever it appears, and case does not matter
    red = tok.tokenizer("red", add_special_tokens=False)["input_ids"]
    assert ids[0, 2:2 + len(red)].tolist() == red == ids[2, 2:2 + len(red)].tolist()
    assert tok.decode(ids) == [t.lower() for t in text]
    assert tok.decode("unchanged") == "unchanged"
    # truncation keeps max_length
    assert tok([" ".join(["red"] * 200)]).shape == (1, 77)
    _, _, (_, _, vq_ids) = tok.encode(text)
    assert torch.equal(vq_ids, ids)
    short = BERTTokenizer(vq_interface=False, max_length=16, tokenizer_path=tokenizer_dir).encode(text)
    assert short.shape == (3, 16) and torch.equal(short[:2], ids[:2, :16])


def test_bert_tokenizer_follows_module_device(tokenizer_dir):
    tok = BERTTokenizer(tokenizer_path=tokenizer_dir).to("meta")
    assert tok("a red circle").device.type == "meta"
    assert tok.state_dict() == {}


def test_missing_tokenizer_error_names_it(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import time
    with pytest.raises(OSError) as err:
        BERTTokenizer(tokenizer_path="ldm-tests/no-such-bert-tokenizer")
    msg = str(err.value)
    assert "'ldm-tests/no-such-bert-tokenizer'" in msg and "tokenizer_path" in msg and "local folder" in msg
    missing = tmp_path / "nowhere" / "tok"
    with pytest.raises(FileNotFoundError, match="does not exist.*tokenizer_path"):
        BERTEmbedder(n_embed=8, n_layer=1, tokenizer_path=str(missing))
    with pytest.raises(OSError, match="holds no vocabulary"):
        BERTTokenizer(tokenizer_path=tmp_path)


def test_bert_embedder_end_to_end(tokenizer_dir):
    torch.manual_seed(0)
    model = BERTEmbedder(n_embed=32, n_layer=2, vocab_size=256, device="cuda", tokenizer_path=tokenizer_dir)
    assert sorted(model.state_dict()) == sorted(expected_keys(2))
    text = ["a red circle on a white background", "a green square on a black background"]
    z = model.encode(text)
    assert z.shape == (2, 77, 32)
    assert not torch.allclose(z[0], z[1])
    z.pow(2).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == ["transformer.to_logits.weight", "transformer.to_logits.bias"]  # unused for embeddings
    # without the tokenizer the embedder takes token ids
    raw = BERTEmbedder(n_embed=32, n_layer=1, vocab_size=256, use_tokenizer=False)
    assert raw(model.tknz_fn(text)).shape == (2, 77, 32)


def test_bert_embedder_rejects_too_small_vocab(tokenizer_dir):
    with pytest.raises(ValueError, match="vocab_size=10"):
        BERTEmbedder(n_embed=8, n_layer=1, vocab_size=10, tokenizer_path=tokenizer_dir)
