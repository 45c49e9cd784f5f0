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
    assert all(r["seconds"] > 0 and r["peak_rss_gib"] > 0 for r in result.values())
    assert result["ours"]["peak_rss_gib"] != result["diffusers"]["peak_rss_gib"]  # measured per process
    for folder in ("ours/samples", "diffusers"):
        assert Image.open(next((tmp_path / folder).glob("*.png"))).size == (32, 32)
    assert "ours / diffusers: wall" in capsys.readouterr().out
