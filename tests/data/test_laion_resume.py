"""Exact mid-epoch resume from tar shards through main.py: a run killed (SIGKILL, every process) after the checkpoint
of step 10 and resumed with `-r` trains on the same batches, byte for byte, as an uninterrupted run, for 1 and 2
processes (CPU, gloo) and 0 and 2 DataLoader workers; within a data epoch the ranks together see every sample once."""
import sys
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

HELPERS = Path(__file__).resolve().parents[1] / "reliability"
sys.path.insert(0, str(HELPERS))
from run_helpers import read_records, run_main, tiny_shard_config, write_fixture_shards  # noqa: E402

CHECKPOINT, KILL, STEPS = 10, 13, 60  # the resumed run trains steps 11 ... 60 (CHECKPOINT + 50)
TIMEOUT = 300  # s; each run takes 15-60 s (a run that hangs fails with its processes' stacks)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_fixture_shards(root, shards=8, per_shard=6)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("devices, workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_killed_and_resumed_run_sees_the_uninterrupted_batches(tmp_path, shards, devices, workers):
    flags = ["--accelerator", "cpu", "--devices", str(devices)] + (["--strategy", "ddp"] if devices > 1 else [])
    full_dir, run_dir = tmp_path / "full", tmp_path / "killed"
    for where in (full_dir, run_dir):
        where.mkdir()
        OmegaConf.save(OmegaConf.create(tiny_shard_config(shards, where / "rec", workers=workers)), where / "c.yaml")
    full = run_main(full_dir, "-b", "c.yaml", "-t", "--no-test", "--max_steps", str(STEPS), *flags, timeout=TIMEOUT)
    assert full.returncode == 0, full.output[-3000:]
    killer = {"lightning": {"callbacks": {"killer": {"target": "run_helpers.KillAt", "params": {"step": KILL}}}}}
    OmegaConf.save(OmegaConf.create(killer), run_dir / "kill.yaml")
    killed = run_main(run_dir, "-b", "c.yaml", "kill.yaml", "-t", "--no-test", "--max_steps", str(STEPS), *flags,
                      timeout=TIMEOUT)
    assert killed.returncode == -9, killed.output[-3000:]
    (run,) = (run_dir / "logs").iterdir()
    resumed = run_main(run_dir, "-r", str(run.relative_to(run_dir)), "-t", "--no-test", "--max_steps", str(STEPS),
                       *flags, "lightning.callbacks.killer=null", timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.output[-3000:]
    for rank in range(devices):
        expected = read_records(full_dir / "rec" / f"rank{rank}.jsonl")
        got = read_records(run_dir / "rec" / f"rank{rank}.jsonl")
        # the kill reaches the ranks at slightly different times: a rank may not have recorded step KILL yet
        cut = next(i for i in range(1, len(got)) if got[i]["step"] < got[i - 1]["step"])
        assert KILL <= cut <= KILL + 1
        assert [r["step"] for r in got] == list(range(cut)) + list(range(CHECKPOINT, STEPS))
        before, after = got[:cut], got[cut:]
        assert [r["digest"] for r in before] == [r["digest"] for r in expected[:cut]]
        assert [r["digest"] for r in after] == [r["digest"] for r in expected[CHECKPOINT:]], f"rank {rank}"
    # the ranks together: every sample exactly once per data epoch (4 complete epochs of 48 in 60 steps x 2 x 2)
    records = [r for rank in range(devices) for r in read_records(full_dir / "rec" / f"rank{rank}.jsonl")]
    per_epoch = {}
    for record in records:
        for key, epoch in zip(record["keys"][0], record["data_epochs"]):
            per_epoch.setdefault(epoch, Counter())[key] += 1
    complete = [e for e in per_epoch if sum(per_epoch[e].values()) == 48]
    assert len(complete) >= (2 if devices == 1 else 4)
    for epoch in complete:
        assert per_epoch[epoch] == Counter(f"{i:09d}" for i in range(48))
