"""CLIP image encoders (unCLIP's FrozenOpenCLIPImageEmbedder and ClipImageEmbedder, latent-diffusion's
FrozenClipImageEmbedder), latent-diffusion's FrozenCLIPTextEmbedder, and IdentityEncoder.

OpenAI-CLIP models are checked against OpenAI's own model code (`clip/model.py` as the clip-anytorch package ships
it, read without the package's download helpers): our state_dict builds OpenAI's CLIP and gives the same
embeddings. open_clip towers are checked against open_clip's full CLIP model on the same weights. Tiny random
architectures are registered with open_clip; nothing is downloaded."""
import importlib.util
import json
import urllib.error
import urllib.request

import kornia
import open_clip
import pytest
import torch

from ldm.modules.encoders.modules import (
    ClipImageEmbedder,
    FrozenClipImageEmbedder,
    FrozenCLIPTextEmbedder,
    FrozenOpenCLIPImageEmbedder,
    IdentityEncoder,
    MissingPretrainedModelError,
)
from ldm.util import CheckpointError, ConfigError, instantiate_from_config

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# OpenAI-style (1 head per 64 channels, as OpenAI's build_model infers) and open_clip-style tiny architectures
ARCHS = {
    "ldm-test-openai-tiny": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
                             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1,
                                          "layers": 1}},
    "ldm-test-openclip-tiny": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32,
                                                               "head_width": 16, "patch_size": 8},
                               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                                            "layers": 2}},
}


@pytest.fixture(scope="module", autouse=True)
def tiny_archs(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    for name, cfg in ARCHS.items():
        (root / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(root / f"{name}.json")


@pytest.fixture(scope="module")
def openai_clip():
    """OpenAI's CLIP model code (clip/model.py of clip-anytorch), loaded on its own."""
    spec = importlib.util.find_spec("clip")
    path = next(iter(spec.submodule_search_locations)) + "/model.py"
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def images(n=3, size=48, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def original_preprocess(x, size, antialias):
    """The originals' preprocessing, written out: kornia bicubic resize, [-1, 1] -> [0, 1], CLIP normalisation."""
    x = kornia.geometry.resize(x, (size, size), interpolation="bicubic", align_corners=True, antialias=antialias)
    return kornia.enhance.normalize((x + 1.0) / 2.0, torch.tensor(MEAN), torch.tensor(STD))


def assert_frozen(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    torch.nn.Sequential(encoder).train()
    assert not any(m.training for m in encoder.modules())


def openai_reference(openai_clip, model):
    """OpenAI's CLIP built from `model`'s state dict. build_model stores float16 weights (as OpenAI ships them):
    both models get those weights, in float32."""
    reference = openai_clip.build_model({k: v.clone() for k, v in model.state_dict().items()}).float().eval()
    model.load_state_dict(reference.state_dict())
    return reference


# ---------------------------------------------------------------- OpenAI CLIP image embedders


def test_clip_image_embedder_is_openai_clip_on_the_same_weights(openai_clip):
    torch.manual_seed(0)
    embedder = ClipImageEmbedder("ldm-test-openai-tiny", pretrained=False)
    reference = openai_reference(openai_clip, embedder.model)
    state = embedder.model.state_dict()
    assert set(reference.state_dict()) == set(state)  # OpenAI's key layout: model.visual.*, model.transformer.*, ...
    x = images()
    with torch.no_grad():
        expected = reference.encode_image(original_preprocess(x, 32, antialias=True))
        out = embedder(x)
    assert out.shape == (3, 32)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    # antialiasing (on by default here, off in latent-diffusion's FrozenClipImageEmbedder) changes a downscale
    plain = FrozenClipImageEmbedder("ldm-test-openai-tiny", pretrained=False)
    plain.model.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), reference.encode_image(original_preprocess(x, 32, antialias=False)),
                                   rtol=1e-4, atol=1e-4)
        big = images(1, size=128)  # a 4x downscale: antialiasing blurs first
        assert (plain.preprocess(big) - embedder.preprocess(big)).abs().max() > 0.05
    assert set(embedder.state_dict()) == {f"model.{k}" for k in state}
    assert all(p.requires_grad for p in embedder.parameters())  # ClipImageEmbedder trains unless its owner freezes
    assert_frozen(plain)


def test_clip_image_embedder_loads_openai_checkpoint_files(openai_clip, tmp_path):
    torch.manual_seed(1)
    source = ClipImageEmbedder("ldm-test-openai-tiny", pretrained=False)
    state = {k: v.half() for k, v in source.model.state_dict().items()}  # OpenAI ships float16 weights
    path = tmp_path / "ViT-tiny.pt"
    torch.save(state, path)
    loaded = instantiate_from_config({"target": "ldm.modules.encoders.modules.ClipImageEmbedder",
                                      "params": {"model": str(path)}})
    reference = openai_clip.build_model(dict(state)).float().eval()
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference.encode_image(original_preprocess(x, 32, True)),
                                   rtol=1e-4, atol=1e-4)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pt' is not an OpenAI CLIP checkpoint"):
        ClipImageEmbedder(str(tmp_path / "broken.pt"))


def test_openai_clip_names_offline_and_unknown(no_network, tmp_path):
    with pytest.raises(MissingPretrainedModelError, match=r"OpenAI CLIP weights 'ViT-L/14' is not available: it is "
                                                          r"not in ~/.cache/clip.*embedder_config.params.model"):
        ClipImageEmbedder("ViT-L/14")
    with pytest.raises(ConfigError, match="'ViT-Q/99' is neither a file nor an OpenAI CLIP name"):
        ClipImageEmbedder("ViT-Q/99")
    with pytest.raises(MissingPretrainedModelError, match="there is no such file"):
        ClipImageEmbedder(str(tmp_path / "missing" / "ViT-L-14.pt"))
    with pytest.raises(ConfigError, match="has no OpenAI weights"):
        ClipImageEmbedder("ldm-test-openai-tiny")  # a random-only architecture needs pretrained: false


def test_image_embedding_dropout_follows_ucg_rate():
    torch.manual_seed(0)
    embedder = ClipImageEmbedder("ldm-test-openai-tiny", pretrained=False, ucg_rate=0.5).eval()
    x = images(1).expand(400, -1, -1, -1)
    with torch.no_grad():
        z = embedder(x)
        kept = z.abs().sum(1) > 0
        assert 0.4 < kept.float().mean() < 0.6  # whole embeddings dropped at the rate, as the original (any mode)
        torch.testing.assert_close(z[kept], embedder(x[:1], no_dropout=True).expand(int(kept.sum()), -1))
        assert (embedder(x[:50], no_dropout=True).abs().sum(1) > 0).all()


# ---------------------------------------------------------------- open_clip vision tower


def test_openclip_image_embedder_is_open_clip_without_its_text_transformer(tmp_path):
    torch.manual_seed(0)
    full = open_clip.create_model("ldm-test-openclip-tiny", pretrained=None).eval()
    path = tmp_path / "open_clip_model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    embedder = FrozenOpenCLIPImageEmbedder(arch="ldm-test-openclip-tiny", version=str(tmp_path))  # a folder
    expected_keys = {f"model.{k}" for k in full.state_dict() if not k.startswith("transformer.")}
    assert set(embedder.state_dict()) == expected_keys
    assert "model.token_embedding.weight" in expected_keys  # the original kept everything but model.transformer
    x = images()
    with torch.no_grad():
        expected = full.encode_image(original_preprocess(x, 32, antialias=True))
        torch.testing.assert_close(embedder(x), expected, rtol=1e-5, atol=1e-5)
    assert_frozen(embedder)
    # random weights with version null, then the same weights by state_dict: a round trip
    random = FrozenOpenCLIPImageEmbedder(arch="ldm-test-openclip-tiny", version=None)
    with torch.no_grad():
        assert not torch.allclose(random(x), expected)
        random.load_state_dict(embedder.state_dict(), strict=True)
        torch.testing.assert_close(random(x), expected, rtol=0, atol=0)


def test_openclip_image_embedder_errors(tmp_path):
    with pytest.raises(ValueError, match="layer must be 'pooled'"):
        FrozenOpenCLIPImageEmbedder(arch="ldm-test-openclip-tiny", version=None, layer="penultimate")
    with pytest.raises(MissingPretrainedModelError, match="embedder_config.params.version"):
        FrozenOpenCLIPImageEmbedder(arch="ldm-test-openclip-tiny", version=str(tmp_path / "none.safetensors"))
    text_only = open_clip.create_model("ldm-test-openclip-tiny", pretrained=None).state_dict()
    torch.save({k: v for k, v in text_only.items() if not k.startswith("visual.")}, tmp_path / "text.pt")
    with pytest.raises(CheckpointError, match="does not hold the vision tower"):
        FrozenOpenCLIPImageEmbedder(arch="ldm-test-openclip-tiny", version=str(tmp_path / "text.pt"))
    with pytest.raises(ConfigError, match="not an open_clip model config"):
        FrozenOpenCLIPImageEmbedder(arch="ViT-Nope", version=None)


# ---------------------------------------------------------------- latent-diffusion's OpenAI CLIP text embedder


def test_clip_text_embedder_normalised_repeated_and_openai_equal(openai_clip):
    torch.manual_seed(0)
    embedder = FrozenCLIPTextEmbedder("ldm-test-openai-tiny", n_repeat=3, pretrained=False)
    assert_frozen(embedder)
    text = ["a photograph of an astronaut riding a horse", "a cat"]
    reference = openai_reference(openai_clip, embedder.model)
    with torch.no_grad():
        z = embedder(text)
        expected = reference.encode_text(open_clip.tokenize(text))
        torch.testing.assert_close(z, expected / expected.norm(dim=1, keepdim=True), rtol=1e-4, atol=1e-4)
        assert torch.allclose(z.norm(dim=1), torch.ones(2))
        context = embedder.encode(text)
    assert context.shape == (2, 3, 32) and torch.equal(context[:, 2], z)
    raw = FrozenCLIPTextEmbedder("ldm-test-openai-tiny", normalize=False, pretrained=False)
    raw.load_state_dict(embedder.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(raw(text), expected, rtol=1e-4, atol=1e-4)


def test_identity_encoder_returns_its_input():
    x = torch.randn(2, 5)
    encoder = instantiate_from_config({"target": "ldm.modules.encoders.modules.IdentityEncoder"})
    assert isinstance(encoder, IdentityEncoder) and encoder.encode(x) is x and encoder(x) is x
