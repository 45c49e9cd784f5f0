"""scripts/benchmark_ldm_f.py runs every factor side by side and counts the work the compression factor saves."""
import re


def test_table_has_one_row_per_factor_with_counted_work(scripts, capsys):
    bench = scripts("benchmark_ldm_f")
    small = ["data.params.batch_size=2", "model.params.unet_config.params.model_channels=32"]
    assert bench.main(["--factors", "1", "4", "--train-steps", "1", "--sample-batch", "2", "--ddim-steps", "2",
                       "--repeats", "1", "--threads", "1", *small]) == 0
    out = capsys.readouterr().out
    rows = {int(m[0]): m for m in re.findall(r"^ *(\d) +(\S+) +([\d,]+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+)",
                                                out, re.M)}
    assert sorted(rows) == [1, 4]
    assert rows[1][1] == "3x32x32" and rows[4][1] == "4x8x8"
    params = {f: int(r[2].replace(",", "")) for f, r in rows.items()}
    assert abs(params[1] - params[4]) < 0.01 * params[1]  # one UNet for both
    train_gflop = {f: float(r[3]) for f, r in rows.items()}
    # 16x fewer positions: the UNet's work per step shrinks ~16x; the frozen encoder adds a little back
    assert 5 < train_gflop[1] / train_gflop[4] < 17
    assert all(float(r[4]) > 0 and float(r[6]) > 0 for r in rows.values())
    assert "DDIM 2 steps, batch 2" in out


def test_a_missing_config_is_one_line(scripts, capsys, tmp_path):
    bench = scripts("benchmark_ldm_f")
    assert bench.main(["--factors", "3", "--config", str(tmp_path / "ldm-f{f}.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --config: {tmp_path / 'ldm-f3.yaml'} (f = 3) does not exist"
