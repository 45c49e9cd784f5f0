"""scripts/reliability.py end to end (main.py subprocesses): SIGKILLs with resume, NaN steps, failing checkpoint
writes and corrupt images, each experiment checked against its targets (smaller than the script's default runs)."""
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reliability():
    spec = importlib.util.spec_from_file_location("reliability", REPO / "scripts" / "reliability.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_sigkills_lose_at_most_one_interval_and_resume_to_the_uninterrupted_state(reliability, tmp_path):
    result = reliability.kill_experiment(tmp_path, kills=2, interval=5, steps=40, seed=1)
    assert result["kills"] == result["survived"] == 2
    assert result["inside_write"] >= 1 and result["corrupt_checkpoints"] == 0
    assert max(result["steps_lost"]) <= 5
    assert result["restored"] and all(result["restored"].values()), result["restored"]
    assert all(ok for _, _, ok in reliability.kill_lines(result))


@pytest.mark.slow
def test_nan_steps_are_skipped_and_stop_training_without_touching_the_last_good_checkpoint(reliability, tmp_path):
    result = reliability.nan_experiment(tmp_path)
    assert all(ok for _, _, ok in reliability.nan_lines(result)), result
    (streak,) = result["streak_errors"]
    assert "3 consecutive training steps had a non-finite loss" in streak
    (weights,) = result["weights_errors"]
    assert "refusing to save a checkpoint at step 8" in weights


@pytest.mark.slow
def test_a_full_or_unwritable_disk_keeps_the_previous_checkpoint_and_names_the_file(reliability, tmp_path):
    result = reliability.disk_experiment(tmp_path)
    assert all(ok for _, _, ok in reliability.disk_lines(result)), result
    assert "No space left on device" in result["ENOSPC"]["errors"][0]
    assert "Permission denied" in result["EACCES"]["errors"][0]


@pytest.mark.slow
def test_five_percent_corrupt_images_are_counted_and_named(reliability, tmp_path):
    result = reliability.corrupt_experiment(tmp_path)
    assert result["corrupt"] == 3 and result["completed"] and result["counted"] and result["named_in_log"]
