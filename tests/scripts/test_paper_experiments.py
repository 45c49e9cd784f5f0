"""scripts/paper_experiments.py end to end at a tiny size: the compression experiment trains autoencoder and LDMs
through main.py (stopped by training time, checkpointed by TrainTimeCheckpoints), scores each checkpoint; guidance
and steps score one of those models; every experiment writes its JSON, CSV and PNG; user mistakes are one line."""
import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
from PIL import Image

LAYER = "64"  # small covariances: FID on 2048 features of 16 images is slow on CPU
FID, PRECISION, RECALL = "fid_d64@16", "precision_d64@16", "recall_d64@16"
TINY = ["-n", "16", "--n-real", "16", "--batch-size", "8", "--feature-layer", LAYER]
TRAIN = ["--train-overrides", "lightning.trainer.max_steps=2", "data.params.batch_size=2",
         "lightning.trainer.limit_val_batches=1",
         "--ldm-overrides", "model.params.unet_config.params.model_channels=32"]


def _evaluation_conftest():
    """tests/evaluation/conftest.py, whose session_inception_weights builds the converted weights once."""
    path = Path(__file__).resolve().parents[1] / "evaluation" / "conftest.py"
    spec = importlib.util.spec_from_file_location("evaluation_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return _evaluation_conftest().session_inception_weights(tmp_path_factory)


@pytest.fixture(scope="module")
def experiments(scripts, weights, tmp_path_factory):
    """The three experiments run once, tiny; (workdir, out folder, the driver module)."""
    root = tmp_path_factory.mktemp("paper")
    work, out = root / "logs", root / "docs"
    common = [*TINY, "--workdir", str(work), "--out", str(out)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LDM_INCEPTION_WEIGHTS", weights.path)
        patch.setenv("LDM_CACHE_DIR", str(root / "cache"))
        driver = scripts("paper_experiments")
        # 0.001 minutes: the time budget is spent in the first step, so each LDM stops after one step
        assert driver.main(["compression", "--factors", "1", "2", "--minutes", "0.001", "--checkpoints", "1",
                            "--steps", "2", *common, *TRAIN]) == 0
        run = sorted((work / "compression").glob("*_ldm-f2"))[-1]
        assert driver.main(["guidance", "--run", str(run), "--scales", "1", "3", "--steps", "2", *common]) == 0
        assert driver.main(["steps", "--run", str(run), "--samplers", "ddim", "dpmpp_2m", "--step-counts", "2", "4",
                            *common]) == 0
    return work, out, driver


def record(out, name):
    data = json.loads((out / f"{name}.json").read_text())
    with open(out / f"{name}.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(data["rows"])
    with Image.open(out / f"{name}.png") as image:
        assert image.format == "PNG" and image.size[0] > 300
    return data, rows


@pytest.mark.slow
def test_compression_trains_each_factor_for_equal_time_and_scores_its_checkpoints(experiments):
    work, out, _ = experiments
    data, rows = record(out, "compression")
    assert [row["f"] for row in data["rows"]] == [1, 2]
    for row in data["rows"]:
        # stopped by the time budget (0.06 s) after one step, before max_steps=2
        assert row["step"] == 1 and row["train_seconds"] > 0.06
        assert row["checkpoint"].startswith("step=000001-train-seconds=")
        assert math.isfinite(row[FID]) and row[FID] > 0 and 0 <= row[PRECISION] <= 1
        assert row["images_per_second"] > 0
    assert sorted(data["runs"]) == ["1", "2"]
    # one autoencoder, for f = 2 (f = 1 is pixel space), its EMA weights extracted as the LDM's first stage
    autoencoders = list((work / "compression").glob("*_ae-*"))
    assert [run.name.split("_")[-1] for run in autoencoders] == ["ae-f2"]
    assert (autoencoders[0] / "checkpoints" / "last-ema-fp32.safetensors").is_file()
    assert data["floor"][FID] >= 0 and data["n"] == 16 and rows[0]["f"] == "1"
    assert data["command"].startswith("python scripts/paper_experiments.py compression --factors 1 2")


@pytest.mark.slow
def test_a_finished_run_is_reused_only_with_the_same_settings(experiments):
    work, _, driver = experiments
    ldm = sorted((work / "compression").glob("*_ldm-f2"))[-1]
    settings = json.loads((ldm / driver.SETTINGS).read_text())
    assert driver.finished_run(work / "compression", "ldm-f2", settings) == ldm
    assert driver.finished_run(work / "compression", "ldm-f2", {**settings, "overrides": []}) is None


@pytest.mark.slow
def test_guidance_and_steps_score_one_model_per_setting(experiments):
    _, out, _ = experiments
    guidance, _ = record(out, "guidance")
    assert [row["scale"] for row in guidance["rows"]] == [1.0, 3.0]
    assert all(0 <= row[RECALL] <= 1 for row in guidance["rows"])
    steps, _ = record(out, "steps")
    # the same model, seeds, labels and sampler (DDIM 2 steps, no guidance) draw the same samples in both experiments
    assert guidance["rows"][0][FID] == steps["rows"][0][FID]
    assert guidance["rows"][0][PRECISION] == steps["rows"][0][PRECISION]
    assert [(row["sampler"], row["steps"]) for row in steps["rows"]] == \
        [("ddim", 2), ("dpmpp_2m", 2), ("ddim", 4), ("dpmpp_2m", 4)]
    fids = [row[FID] for row in steps["rows"]]
    assert all(math.isfinite(fid) for fid in fids) and len(set(fids)) > 1  # the settings change the samples
    assert steps["model_step"] == guidance["model_step"] == 1


def test_guidance_without_a_trained_model_is_one_line(scripts, tmp_path, capsys):
    driver = scripts("paper_experiments")
    assert driver.main(["guidance", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no trained f = 4 LDM under") and "--run" in err[0]


def test_a_wrong_autoencoder_run_is_one_line(scripts, tmp_path, capsys):
    driver = scripts("paper_experiments")
    assert driver.main(["compression", "--workdir", str(tmp_path), "--autoencoder", f"4={tmp_path}/none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --autoencoder 4={tmp_path}/none: expected F=RUN, RUN a main.py run with "
                   "checkpoints/last.ckpt"]
    assert not list(tmp_path.glob("compression/*"))  # nothing trained


def test_scored_checkpoints_skip_a_last_ckpt_older_than_the_time_budget(scripts, tmp_path):
    import torch

    driver = scripts("paper_experiments")
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)

    def save(name, step, seconds):
        torch.save({"global_step": step, "callbacks": {"TrainClock{'name': 'time/train_seconds'}":
                                                       {"train_seconds": seconds}}}, folder / name)

    save("step=000010-train-seconds=100.ckpt", 10, 100.5)
    save("step=000020-train-seconds=200.ckpt", 20, 200.2)
    save("last.ckpt", 14, 150.0)  # written at an epoch end, before the budget stopped the run mid-epoch
    found = driver.scored_checkpoints(tmp_path / "run")
    assert [(ckpt.name, step, seconds) for ckpt, step, seconds in found] == [
        ("step=000010-train-seconds=100.ckpt", 10, 100.5), ("step=000020-train-seconds=200.ckpt", 20, 200.2)]
    assert driver.final_checkpoint(tmp_path / "run").name == "step=000020-train-seconds=200.ckpt"
    save("last.ckpt", 25, 230.0)  # trained on after the last mark
    assert driver.final_checkpoint(tmp_path / "run").name == "last.ckpt"
