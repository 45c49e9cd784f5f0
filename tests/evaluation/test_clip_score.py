"""CLIP score from a local CLIP folder (a tiny random CLIPModel with open_clip's tokenizer vocabulary), against a
direct computation with the same model; no folder is one line."""
import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from ldm.evaluation.clip_score import ClipScore, resolve_clip_model
from ldm.evaluation.common import EvaluationError
from ldm.modules.encoders.frozen import write_clip_tokenizer


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = write_clip_tokenizer(tmp_path_factory.mktemp("clip") / "tiny-clip")
    torch.manual_seed(0)
    config = CLIPConfig(text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64,
                                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77},
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


def test_clip_score_equals_the_direct_computation(clip_folder):
    images = torch.randint(0, 256, (3, 3, 16, 16), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    captions = ["a red circle on a white background", "a blue square on a black background", "a green triangle"]
    scorer = ClipScore(clip_folder, "--clip-model")
    scorer.update(images[:2], captions[:2])
    scorer.update(images[2:], captions[2:])
    got = scorer.compute(3)

    model, processor = CLIPModel.from_pretrained(clip_folder).eval(), CLIPProcessor.from_pretrained(clip_folder)
    inputs = processor(text=captions, images=list(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"])
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    image, text = (getattr(v, "pooler_output", v) for v in (image, text))
    cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    expected = max(float(100 * cosine.mean()), 0.0)
    assert got == {"clip_score@3": pytest.approx(expected, rel=1e-4, abs=1e-4)}


def test_no_clip_folder_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("LDM_CLIP_MODEL", raising=False)
    with pytest.raises(EvaluationError) as err:
        resolve_clip_model()
    assert "\n" not in str(err.value) and "--clip-model" in str(err.value) and "LDM_CLIP_MODEL" in str(err.value)
    with pytest.raises(EvaluationError, match="is not a CLIP model folder"):
        ClipScore(str(tmp_path), "--clip-model")
