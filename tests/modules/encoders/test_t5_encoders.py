"""FrozenT5Embedder and FrozenCLIPT5Encoder on tiny models built and saved here: a T5 tokenizer trained with
`tokenizers` (SentencePiece-style unigram) on a few sentences, and a random 2-layer T5EncoderModel; the embeddings
are checked against transformers run directly."""
import huggingface_hub.constants
import pytest
import torch
from tokenizers import SentencePieceUnigramTokenizer
from tokenizers.processors import TemplateProcessing
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

from ldm.modules.encoders.modules import (
    FrozenCLIPT5Encoder,
    FrozenT5Embedder,
    MissingPretrainedModelError,
    write_clip_tokenizer,
)
from ldm.util import instantiate_from_config

SENTENCES = ["a photograph of an astronaut riding a horse", "a painting of a cat in the snow",
             "a red circle on a white background", "two dogs playing with a ball"]


def t5_tokenizer(folder):
    """A T5 tokenizer (SentencePiece-style unigram trained on SENTENCES, </s> appended), saved in `folder`."""
    backend = SentencePieceUnigramTokenizer()
    backend.train_from_iterator(SENTENCES * 5, vocab_size=80, special_tokens=["<pad>", "</s>", "<unk>"],
                                unk_token="<unk>", show_progress=False)
    backend.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True)
    backend.save(str(folder / "tokenizer.json"))
    tokenizer = T5Tokenizer(tokenizer_file=str(folder / "tokenizer.json"), eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>", extra_ids=0)
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture(scope="module")
def t5_dirs(tmp_path_factory):
    """Two FrozenT5Embedder folders: one tokenizer, two random 2-layer T5 encoders (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("t5")
    tokenizer = t5_tokenizer(root / "t5-0")
    folders = [root / "t5-0", root / "t5-1"]
    tokenizer.save_pretrained(folders[1])
    for seed, folder in enumerate(folders):
        torch.manual_seed(seed)
        config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        T5EncoderModel(config).save_pretrained(folder)
    return folders


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = write_clip_tokenizer(tmp_path_factory.mktemp("clip") / "clip")
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=77)).save_pretrained(folder)
    return folder


def test_t5_embedder_is_the_t5_encoder_on_padded_tokens(t5_dirs):
    embedder = instantiate_from_config({"target": "ldm.modules.encoders.modules.FrozenT5Embedder",
                                        "params": {"version": str(t5_dirs[0]), "max_length": 24}})
    text = ["a cat", "two dogs"]
    z = embedder(text)
    assert z.shape == (2, 24, 32)
    tokenizer = T5Tokenizer.from_pretrained(t5_dirs[0])
    ids = tokenizer(text, truncation=True, max_length=24, padding="max_length", return_tensors="pt").input_ids
    assert (ids[:, -1] == 0).any() and (ids == 1).sum() == 2  # padded, one </s> each: a real tokenizer run
    reference = T5EncoderModel.from_pretrained(t5_dirs[0]).eval()
    with torch.no_grad():
        torch.testing.assert_close(z, reference(input_ids=ids).last_hidden_state, rtol=0, atol=0)
    keys = set(embedder.state_dict())
    assert "transformer.encoder.block.0.layer.0.SelfAttention.q.weight" in keys and "transformer.shared.weight" in keys
    assert not any(".decoder." in k for k in keys)  # the encoder stack only, as T5EncoderModel
    # frozen: eval and out of any optimiser's reach
    assert not any(p.requires_grad for p in embedder.parameters())
    torch.nn.Sequential(embedder).train()
    assert not embedder.training


def test_t5_embedder_state_dict_round_trip(t5_dirs):
    first, second = FrozenT5Embedder(str(t5_dirs[0])), FrozenT5Embedder(str(t5_dirs[1]))
    assert not torch.allclose(first(SENTENCES), second(SENTENCES))
    second.load_state_dict(first.state_dict(), strict=True)
    torch.testing.assert_close(second(SENTENCES), first(SENTENCES), rtol=0, atol=0)


def test_t5_embedder_missing_model_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MissingPretrainedModelError, match=r"FrozenT5Embedder model '.*nowhere' is not available: "
                                                          r"there is no such folder"):
        FrozenT5Embedder(str(tmp_path / "nowhere"))
    with pytest.raises(MissingPretrainedModelError, match="google/t5-v1_1-large' is not available.*T5EncoderModel"):
        FrozenT5Embedder()


def test_clip_t5_encoder_returns_both_contexts(t5_dirs, clip_dir):
    encoder = FrozenCLIPT5Encoder(clip_version=str(clip_dir), t5_version=str(t5_dirs[0]), clip_max_length=77,
                                  t5_max_length=10)
    clip_z, t5_z = encoder.encode(SENTENCES[:3])
    assert clip_z.shape == (3, 77, 16) and t5_z.shape == (3, 10, 32)
    torch.testing.assert_close(t5_z, FrozenT5Embedder(str(t5_dirs[0]), max_length=10)(SENTENCES[:3]))
    assert {k.split(".")[0] for k in encoder.state_dict()} == {"clip_encoder", "t5_encoder"}
    assert not any(p.requires_grad for p in encoder.parameters())
