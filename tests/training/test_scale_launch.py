"""Launching main.py beyond one process: torchrun, SLURM (environment detection with a faked SLURM_*, two faked
srun tasks training as one DDP run, the example sbatch script with a fake srun), and SIGTERM from the scheduler
turning into last.ckpt and exit 143 on every rank."""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]
HELPERS = REPO / "tests" / "reliability"
sys.path.insert(0, str(HELPERS))
from run_helpers import main_env, read_records, tiny_shard_config, write_fixture_shards  # noqa: E402

SLURM_KEYS = ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_NNODES", "SLURM_JOB_ID",
              "SLURM_JOB_NAME", "SLURM_NODELIST", "SLURM_NTASKS_PER_NODE")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_fixture_shards(root, shards=8, per_shard=6)
    return root


@pytest.fixture(scope="module")
def main_module():
    if "main" not in sys.modules:
        spec = importlib.util.spec_from_file_location("main", REPO / "main.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["main"] = module
        spec.loader.exec_module(module)
    return sys.modules["main"]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_env(rank, port, tasks=2, job="4242"):
    env = main_env()
    for key in [k for k in env if k.startswith(("SLURM_", "TORCHELASTIC", "MASTER_", "RANK", "LOCAL_RANK"))]:
        env.pop(key)
    env.update(SLURM_NTASKS=str(tasks), SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODEID="0",
               SLURM_NNODES="1", SLURM_JOB_ID=job, SLURM_JOB_NAME="ldm-train", SLURM_NODELIST="localhost",
               SLURM_NTASKS_PER_NODE=str(tasks), MASTER_PORT=str(port))
    return env


def write_config(where, shards, **kwargs):
    where.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(tiny_shard_config(shards, where / "rec", **kwargs)), where / "c.yaml")


def start(where, args, env):
    return subprocess.Popen([sys.executable, str(REPO / "main.py"), "-l", "logs", *args], cwd=where, env=env,
                            stdout=open(where / f"out-{env.get('SLURM_PROCID', 'x')}.txt", "a"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def output(where, rank):
    return (where / f"out-{rank}.txt").read_text()


def wait_for_step(where, ranks, step, procs, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if all(read_records(where / "rec" / f"rank{r}.jsonl")[-1]["step"] >= step for r in ranks):
                return
        except (FileNotFoundError, IndexError, json.JSONDecodeError):
            pass
        assert all(p.poll() is None for p in procs), "a process ended early"
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached")


def checkpoint(where):
    (run,) = (where / "logs").iterdir()
    return run, torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def loader_ranks(ckpt):
    return ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["ranks"]


def test_a_faked_slurm_environment_is_detected(tmp_path, shards, monkeypatch, main_module):
    from lightning_fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(HELPERS))
    write_config(tmp_path, shards)
    for key, value in slurm_env(1, 29500, job="123456").items():
        if key.startswith("SLURM_") or key == "MASTER_PORT":
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_NODELIST", "node[07-08]")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    parser = main_module.get_parser()
    opt, unknown = parser.parse_known_args(["-b", "c.yaml", "-t", "--accelerator", "cpu", "--devices", "2",
                                            "--strategy", "ddp"])
    _, model, _, trainer, _ = main_module.prepare(opt, unknown, "2024-01-01T00-00-00")
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment)
    assert (environment.global_rank(), environment.local_rank(), environment.world_size()) == (1, 1, 2)
    assert environment.main_address == "node07" and environment.main_port == 15000 + 3456  # from the job id
    assert model.learning_rate == pytest.approx(2 * 2 * 1e-4)  # 2 tasks x batch 2
    assert not (tmp_path / "logs").exists()  # nothing written before training
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # srun --job-name=interactive: SLURM only allocates
    _, _, _, trainer, _ = main_module.prepare(opt, unknown, "2024-01-01T00-00-01")
    assert isinstance(trainer.strategy.cluster_environment, LightningEnvironment)


@pytest.mark.slow
def test_two_slurm_tasks_train_one_ddp_run_and_sigterm_stops_both_with_last_ckpt(tmp_path, shards):
    write_config(tmp_path, shards)
    flags = ["-t", "--no-test", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    port = free_port()
    procs = [start(tmp_path, ["-b", "c.yaml", *flags, "--max_steps", "100000"], slurm_env(rank, port))
             for rank in (0, 1)]
    try:
        wait_for_step(tmp_path, (0, 1), 3, procs)
        for proc in procs:  # srun passes the scheduler's SIGTERM to every task
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(180) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert codes == [143, 143], output(tmp_path, 0)[-3000:]
    assert "stopped by SIGTERM after writing" in output(tmp_path, 0)
    run, ckpt = checkpoint(tmp_path)  # one run directory: rank 1 wrote none
    records = [read_records(tmp_path / "rec" / f"rank{r}.jsonl") for r in (0, 1)]
    assert ckpt["global_step"] == records[0][-1]["step"] + 1 == records[1][-1]["step"] + 1
    assert [r is not None for r in loader_ranks(ckpt)] == [True, True]  # both ranks' data positions saved
    keys = [{k for rec in rank for k in rec["keys"][0]} for rank in records]
    assert not keys[0] & keys[1]  # the ranks read different shards
    assert len(list((run / "configs").glob("*.yaml"))) == 2
    # the requeued job resumes: both tasks go on from the saved step
    stop, resume_port = ckpt["global_step"], free_port()
    procs = [start(tmp_path, ["-r", str(run.relative_to(tmp_path)), *flags, "--max_steps", str(stop + 3)],
                   slurm_env(rank, resume_port)) for rank in (0, 1)]
    assert [proc.wait(300) for proc in procs] == [0, 0], output(tmp_path, 0)[-3000:]
    for rank in (0, 1):
        resumed = read_records(tmp_path / "rec" / f"rank{rank}.jsonl")[len(records[rank]):]
        assert [r["step"] for r in resumed] == [stop, stop + 1, stop + 2]


@pytest.mark.slow
def test_torchrun_two_processes_train_one_run_written_by_rank_zero(tmp_path, shards):
    write_config(tmp_path, shards)
    env = main_env()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "main.py"), "-l", "logs", "-b", "c.yaml", "-t", "--no-test", "--accelerator",
                           "cpu", "--devices", "2", "--strategy", "ddp", "--max_steps", "4"], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    run, ckpt = checkpoint(tmp_path)
    assert ckpt["global_step"] == 4 and len(list((run / "configs").glob("*.yaml"))) == 2
    records = [read_records(tmp_path / "rec" / f"rank{r}.jsonl") for r in (0, 1)]
    assert [len(r) for r in records] == [4, 4]
    assert not {k for rec in records[0] for k in rec["keys"][0]} & {k for rec in records[1] for k in rec["keys"][0]}
    assert "Setting learning rate to 4.00e-04 = 1 (accumulate_grad_batches) * 2 (num_devices)" in proc.stdout


@pytest.mark.slow
def test_sigterm_writes_last_ckpt_and_exits_143_and_the_run_resumes(tmp_path, shards):
    write_config(tmp_path, shards)
    env = main_env()
    proc = start(tmp_path, ["-b", "c.yaml", "-t", "--no-test", "--max_steps", "100000"], env)
    try:
        wait_for_step(tmp_path, (0,), 3, [proc])
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = output(tmp_path, "x")
    assert code == 143, text[-3000:]
    run, ckpt = checkpoint(tmp_path)
    last = run.relative_to(tmp_path) / "checkpoints" / "last.ckpt"
    assert f"main.py: stopped by SIGTERM after writing {last}; resume with main.py -r" in text
    assert ckpt["global_step"] == read_records(tmp_path / "rec" / "rank0.jsonl")[-1]["step"] + 1


def test_the_sbatch_script_starts_resumes_and_requeues(tmp_path, shards):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\necho "srun $*" >> "$FAKE_LOG"\nexit "${FAKE_SRUN_CODE:-0}"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho "scontrol $*" >> "$FAKE_LOG"\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {**main_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "calls.txt"),
           "CONFIG": "c.yaml", "NAME": "job", "SLURM_JOB_ID": "77", "SLURM_NTASKS_PER_NODE": "8",
           "SLURM_NNODES": "2"}
    script = REPO / "scripts" / "slurm" / "train.sbatch"

    def sbatch(**extra):
        return subprocess.run(["bash", str(script), "--max_steps", "10"], cwd=tmp_path, env={**env, **extra},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)

    first = sbatch()
    assert first.returncode == 0 and "new run under logs/job" in first.stdout
    run = tmp_path / "logs" / "job" / "2024-01-01T00-00-00_c"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    preempted = sbatch(FAKE_SRUN_CODE="143")
    assert preempted.returncode == 143 and "requeueing job 77" in preempted.stdout
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls[0] == (f"srun python main.py -b c.yaml -l logs/job -t --accelerator gpu --devices 8 --num_nodes 2 "
                        "--max_steps 10")
    assert calls[1].startswith(f"srun python main.py -r logs/job/{run.name}/ -t ")
    assert calls[2] == "scontrol requeue 77"
