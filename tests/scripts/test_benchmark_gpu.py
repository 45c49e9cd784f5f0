"""scripts/benchmark_gpu.py runs every workload on CPU at tiny shapes (--dry-run); its FLOP counts and MFU arithmetic
are checked, never its timings."""
import pytest
import torch

from tests.scripts.conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmark_gpu")


def test_dry_run_eager_runs_every_workload(bench, capsys):
    rows = bench.main(["--dry-run", "--variants", "eager"])
    assert [(r["workload"], r["batch"]) for r in rows] == [("unet-cfg", 1), ("unet-cfg", 2), ("vae-decode", 1),
                                                            ("train-256", 2)]
    assert all(r["flops"] > 0 and r["seconds"] > 0 for r in rows)
    cfg1, cfg2 = rows[0]["flops"], rows[1]["flops"]
    assert cfg2 == pytest.approx(2 * cfg1, rel=0.02)  # the UNet's FLOPs grow with the batch
    assert "| train-256 | eager | 2 |" in capsys.readouterr().out


@pytest.mark.slow
def test_dry_run_compiled_variants(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    # the smallest graph (the tiny decoder's forward): compiling the training step on CPU takes many minutes
    rows = bench.main(["--dry-run", "--variants", "compile", "compile+cudagraphs", "--workloads", "vae-decode"])
    assert [r["variant"] for r in rows] == ["compile", "compile+cudagraphs"]


def test_flop_count_of_a_matmul_and_mfu(bench):
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert bench.count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    row = dict(workload="w", variant="eager", batch=2, first=1.0, seconds=0.5, flops=100e12)
    assert "| 40.0% |" in bench.report([row], peak=500e12)  # 200 TFLOP/s of 500


def test_peak_from_device_name_or_flag(bench, monkeypatch):
    assert bench.device_peak(torch.device("cpu"), None) == ("cpu", None)
    assert bench.device_peak(torch.device("cpu"), 100.0) == ("cpu", 100e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert bench.device_peak(torch.device("cuda", 0), None) == ("NVIDIA H200", 989e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert bench.device_peak(torch.device("cuda", 0), None)[1] == 312e12
