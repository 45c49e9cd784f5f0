"""scripts/benchmark_txt2img.py runs both frameworks end to end on a tiny SD-like model, each in its own process with
its own peak memory, and both draw an image from the same weights. No timing is asserted."""
import pytest
from PIL import Image

from tests.scripts.conftest import load_script


@pytest.mark.slow
def test_both_frameworks_run_on_the_same_weights(tmp_path, capsys):
    bench = load_script("benchmark_txt2img")
    result = bench.main(["--tiny", "--size", "32", "--steps", "2", "--workdir", str(tmp_path)])
    assert set(result) == {"ours", "diffusers"}
    assert all(r["seconds"] > 0 and r["cpu_seconds"] > 0 and r["peak_rss_gib"] > 0 for r in result.values())
    for r in result.values():  # the phases add up to the run, each was seen by its hooks
        for clock in ("", "cpu_"):
            parts = [r[clock + k] for k in ("setup", "text_encode", "sampling", "decode", "rest")]
            assert sum(parts) == pytest.approx(r[clock + "seconds"]) and min(parts[:4]) > 0
            assert r[clock + "first_step"] + r[clock + "per_step"] == pytest.approx(r[clock + "sampling"])
            assert 0 < r[clock + "first_step"] < r[clock + "sampling"]
    assert result["ours"]["peak_rss_gib"] != result["diffusers"]["peak_rss_gib"]  # measured per process
    for folder in ("ours/samples", "diffusers"):
        assert Image.open(next((tmp_path / folder).glob("*.png"))).size == (32, 32)
    out = capsys.readouterr().out
    assert "ours / diffusers (CPU): total" in out and "ours / diffusers: peak memory" in out
