"""ldm.modules.midas: every MiDaS model type builds with the published checkpoints' keys (enumerated from the
architecture in expected_keys.py), runs a forward of the right shape, loads its weights from a local file or says
which file is missing, and MiDaSInference stays frozen in eval mode."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.modules.midas.api import ISL_PATHS, MiDaSInference, load_midas_transform, load_model
from ldm.modules.midas.midas.dpt_depth import DPTDepthModel
from ldm.modules.midas.midas.midas_net import MidasNet
from ldm.modules.midas.midas.midas_net_custom import MidasNet_small
from ldm.util import CheckpointError, instantiate_from_config

_spec = importlib.util.spec_from_file_location("midas_expected_keys", Path(__file__).with_name("expected_keys.py"))
expected_keys = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(expected_keys)

MODEL_TYPES = ["dpt_hybrid", "dpt_large", "midas_v21", "midas_v21_small"]


def layout(module: torch.nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def assert_same_layout(actual: dict, expected: dict) -> None:
    missing, unexpected = sorted(expected.keys() - actual.keys()), sorted(actual.keys() - expected.keys())
    assert not missing and not unexpected, f"missing {missing[:8]}, unexpected {unexpected[:8]}"
    wrong = {k: (actual[k], expected[k]) for k in expected if actual[k] != expected[k]}
    assert not wrong, f"(actual, expected) shapes differ: {dict(list(wrong.items())[:8])}"


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_state_dict_keys_are_those_of_the_published_weights(model_type):
    with torch.device("meta"):
        inference = MiDaSInference(model_type, model_path=None)
    assert_same_layout(layout(inference.model), expected_keys.EXPECTED[model_type]())
    # inside a depth-to-image model the depth stage's keys are depth_model.model.<published key>
    assert all(k.startswith("model.") for k in inference.state_dict())


def test_published_parameter_counts():
    """DPT paper (Ranftl et al. 2021, table 1): DPT-Hybrid 123M, DPT-Large 343M (our counts include the ViT's
    1000-class head, which the published files keep)."""
    counts = {}
    for model_type in ("dpt_hybrid", "dpt_large"):
        expected = expected_keys.EXPECTED[model_type]()
        counts[model_type] = sum(int(np.prod(s)) for s in expected.values())
    assert round(counts["dpt_hybrid"] / 1e6) == 123
    assert round((counts["dpt_large"] - 1024 * 1000 - 1000) / 1e6) == 343
    assert len(expected_keys.EXPECTED["dpt_hybrid"]()) == 368


@pytest.fixture(scope="module")
def hybrid():
    torch.manual_seed(0)
    return MiDaSInference("dpt_hybrid", model_path=None)


def test_dpt_hybrid_forward_at_384(hybrid):
    x = torch.rand(1, 3, 384, 384) * 2 - 1
    depth = hybrid(x)
    assert depth.shape == (1, 1, 384, 384) and torch.isfinite(depth).all()
    assert not depth.requires_grad
    # smaller inputs work too (position embeddings resized to the token grid); sides must be multiples of 32
    assert hybrid(x[:, :, :64, :96]).shape == (1, 1, 64, 96)
    with pytest.raises(ValueError, match="divisible by 32"):
        hybrid.model(x[:, :, :48, :64])


@pytest.mark.slow
@pytest.mark.parametrize("model_type,size", [("dpt_large", 64), ("midas_v21", 64), ("midas_v21_small", 256)])
def test_other_model_types_run_a_forward(model_type, size):
    torch.manual_seed(0)
    model, transform = load_model(model_type, model_path=None)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        depth = model(x)
    assert depth.shape == (2, size, size) and torch.isfinite(depth).all()
    assert (depth >= 0).all()  # non_negative: a final ReLU
    assert not model.training


def test_midas_inference_is_frozen_and_stays_in_eval(hybrid):
    assert not hybrid.training and not hybrid.model.training
    hybrid.train()
    assert not hybrid.training and not any(m.training for m in hybrid.modules())
    assert not any(p.requires_grad for p in hybrid.parameters())
    built = instantiate_from_config({"target": "ldm.modules.midas.api.MiDaSInference",
                                     "params": {"model_type": "midas_v21_small", "model_path": None}})
    assert isinstance(built.model, MidasNet_small) and not built.training


def test_weights_load_from_a_local_file_and_give_the_same_depth(tmp_path):
    torch.manual_seed(0)
    original = MiDaSInference("midas_v21_small", model_path=None)
    path = tmp_path / "midas_v21_small-70d6b9c8.pt"
    torch.save(original.model.state_dict(), path)  # the published files are bare state dicts
    torch.manual_seed(1)  # another random start: only loading makes the outputs equal
    loaded = MiDaSInference("midas_v21_small", model_path=str(path))
    torch.manual_seed(1)
    unloaded = MiDaSInference("midas_v21_small", model_path=None)
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x), original(x), rtol=0, atol=0)
    assert not torch.allclose(unloaded(x), original(x))


def test_midas_v21_training_checkpoint_layout_loads(tmp_path):
    torch.manual_seed(0)
    net = MidasNet_small(None)
    path = tmp_path / "small.pt"
    torch.save({"model": net.state_dict(), "optimizer": {"state": {}, "param_groups": []}}, path)
    loaded = MidasNet_small(str(path))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))


def test_missing_or_wrong_weights_are_one_clear_error(tmp_path, monkeypatch, caplog):
    with pytest.raises(CheckpointError, match=r"MiDaS weights 'nowhere/dpt\.pt' \(model_path for model_type "
                                              r"'dpt_hybrid'\) do not exist"):
        MiDaSInference("dpt_hybrid", model_path="nowhere/dpt.pt")
    wrong = tmp_path / "wrong.pt"
    torch.save(MidasNet_small(None).state_dict(), wrong)
    with pytest.raises(CheckpointError, match=r"'.*wrong\.pt' do not fit MidasNet: "):
        MidasNet(str(wrong))
    with pytest.raises(ValueError, match="model_type 'dpt_base' is not one of"):
        MiDaSInference("dpt_base")
    # the default: the original's midas_models/ file when present, else random weights and a warning naming it
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ldm.modules.midas.api"):
        MiDaSInference("midas_v21_small")
    assert "no weights at" in caplog.text and ISL_PATHS["midas_v21_small"] in caplog.text
    target = tmp_path / ISL_PATHS["midas_v21_small"]
    target.parent.mkdir()
    torch.save(MidasNet_small(None).state_dict(), target)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ldm.modules.midas"):
        MiDaSInference("midas_v21_small")
    assert "loaded" in caplog.text and "no weights at" not in caplog.text


@pytest.mark.parametrize("model_type,size,mean", [("dpt_hybrid", 384, 0.5), ("midas_v21_small", 256, 0.485)])
def test_transform_keeps_the_aspect_ratio_in_multiples_of_32(model_type, size, mean):
    transform = load_midas_transform(model_type)
    image = np.full((200, 400, 3), 0.75)  # HWC in [0, 1]
    out = transform({"image": image})["image"]
    assert out.dtype == np.float32 and out.shape[0] == 3
    h, w = out.shape[1:]
    assert h % 32 == 0 and w % 32 == 0 and abs(w / h - 2) < 0.2
    if model_type == "dpt_hybrid":  # 'minimal': the scale closest to 1 -> 384 wide... or 384 high
        assert (h, w) in ((192, 384), (384, 768))
    else:  # 'upper_bound': fits inside 256 x 256
        assert max(h, w) <= size
    np.testing.assert_allclose(out[0], (0.75 - mean) / (0.5 if mean == 0.5 else 0.229), rtol=1e-5)


# ---------------------------------------------------------------- parity with transformers' DPT-Hybrid
def to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (the published) DPT-Hybrid keys in transformers' DPTForDepthEstimation naming; qkv split in three."""
    out = {}
    fixed = [
        ("pretrained.model.cls_token", "dpt.embeddings.cls_token"),
        ("pretrained.model.pos_embed", "dpt.embeddings.position_embeddings"),
        ("pretrained.model.patch_embed.proj.", "dpt.embeddings.projection."),
        ("pretrained.model.patch_embed.backbone.stem.conv.", "dpt.embeddings.backbone.bit.embedder.convolution."),
        ("pretrained.model.patch_embed.backbone.stem.norm.", "dpt.embeddings.backbone.bit.embedder.norm."),
        ("pretrained.model.norm.", "dpt.layernorm."),
        ("scratch.output_conv.", "head.head."),
    ]
    block_parts = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
                   "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    fusion_parts = {"out_conv": "projection", "resConfUnit1.conv1": "residual_layer1.convolution1",
                    "resConfUnit1.conv2": "residual_layer1.convolution2",
                    "resConfUnit2.conv1": "residual_layer2.convolution1",
                    "resConfUnit2.conv2": "residual_layer2.convolution2"}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("pretrained.model.head."):
            continue  # the ImageNet classifier: not part of a depth model
        for ours, theirs in fixed:
            if key.startswith(ours):
                out[theirs + key[len(ours):]] = value
                break
        else:
            if key.startswith("pretrained.model.patch_embed.backbone.stages."):
                stage, block, rest = parts[5], parts[7], ".".join(parts[8:])
                out[f"dpt.embeddings.backbone.bit.encoder.stages.{stage}.layers.{block}.{rest}"] = value
            elif key.startswith("pretrained.model.blocks."):
                i, name, leaf = parts[3], ".".join(parts[4:-1]), parts[-1]
                if name == "attn.qkv":
                    for role, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                        out[f"dpt.encoder.layer.{i}.attention.attention.{role}.{leaf}"] = chunk
                else:
                    out[f"dpt.encoder.layer.{i}.{block_parts[name]}.{leaf}"] = value
            elif key.startswith("pretrained.act_postprocess"):
                level, index, leaf = int(parts[1][-1]) - 1, parts[2], parts[-1]
                name = {"0": f"readout_projects.{level}.0", "3": f"layers.{level}.projection",
                        "4": f"layers.{level}.resize"}[index]
                out[f"neck.reassemble_stage.{name}.{leaf}"] = value
            elif key.startswith("scratch.layer"):
                out[f"neck.convs.{int(parts[1][5]) - 1}.{parts[-1]}"] = value
            elif key.startswith("scratch.refinenet"):
                stage = 4 - int(parts[1][-1])  # refinenet4 (coarsest) is transformers' first fusion layer
                out[f"neck.fusion_stage.layers.{stage}.{fusion_parts['.'.join(parts[2:-1])]}.{parts[-1]}"] = value
            else:
                raise AssertionError(f"no transformers name for {key}")
    return out


@pytest.mark.slow
def test_dpt_hybrid_depth_equals_transformers_dpt_hybrid_on_the_same_weights(hybrid):
    """transformers' DPT-Hybrid (converted from the published file by its own script) predicts the same depth from
    our weights: architecture, readout, fusion order and head agree numerically, not only by name."""
    from transformers import DPTConfig, DPTForDepthEstimation

    config = DPTConfig(is_hybrid=True, hidden_size=768, reassemble_factors=[1, 1, 1, 0.5],
                       neck_hidden_sizes=[256, 512, 768, 768], use_batch_norm_in_fusion_residual=False,
                       readout_type="project", image_size=384, patch_size=16)
    with torch.device("meta"):
        reference = DPTForDepthEstimation(config)
    converted = to_transformers(hybrid.model.state_dict())
    assert set(converted) == set(reference.state_dict())  # 368 published keys - head + q/k/v split = 414
    reference.load_state_dict(converted, strict=True, assign=True)
    reference.eval()
    torch.manual_seed(3)
    x = torch.rand(1, 3, 384, 384) * 2 - 1
    with torch.no_grad():
        theirs = reference(pixel_values=x).predicted_depth
        ours = hybrid.model(x)
    assert ours.shape == theirs.shape == (1, 384, 384)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))
