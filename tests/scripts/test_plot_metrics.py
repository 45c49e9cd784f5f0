"""scripts/plot_metrics.py: curves of several runs into one PNG, against steps or training time, and one-line errors."""
import csv
import re

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def plot(scripts):
    return scripts("plot_metrics")


def write_run(root, name, slope, sessions=((0, 40),)):
    """A run directory with csv/metrics.csv as main.py writes it: train rows with the clock, val rows every 10."""
    path = root / name / "csv" / "metrics.csv"
    path.parent.mkdir(parents=True)
    fields = ["epoch", "session", "step", "time/train_seconds", "train/loss_simple_step", "val/loss"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for session, (start, stop) in enumerate(sessions):
            for step in range(start, stop):
                writer.writerow({"epoch": 0, "session": session, "step": step, "time/train_seconds": 2.0 * step + 1,
                                 "train/loss_simple_step": np.exp(-slope * step) + 0.01 * (step % 3)})
                if step % 10 == 9:
                    writer.writerow({"epoch": 0, "session": session, "step": step, "val/loss": np.exp(-slope * step)})
    return path.parent.parent


def test_two_runs_make_one_png_with_a_line_each(tmp_path, plot, capsys):
    a, b = write_run(tmp_path, "run_a", 0.05), write_run(tmp_path, "run_b", 0.1)
    out = tmp_path / "plots" / "curves.png"
    assert plot.main([str(a), str(b / "csv" / "metrics.csv"), "--metrics", "train/*", "val/loss", "--x", "time",
                      "--smooth", "5", "--logy", "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 200
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    # matplotlib's first two colours (C0 blue, C1 orange) are both drawn: one line per run
    for rgb in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(pixels - rgb).sum(axis=1) < 30).sum() > 50, rgb
    printed = capsys.readouterr().out
    assert "train/loss_simple_step  run_a: 40 points" in printed and re.search(r"val/loss +run_b: 4 points", printed)
    assert f"wrote {out}" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["curves.png"]  # written atomically, no temp file


def test_a_missing_metric_is_one_line_listing_the_metrics_there(tmp_path, plot, capsys):
    a = write_run(tmp_path, "run_a", 0.05)
    out = tmp_path / "never.png"
    assert plot.main([str(a), "--metrics", "val/fid@*", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err == ("error: --metrics 'val/fid@*': no such metric in run_a; metrics there: time/train_seconds, "
                   "train/loss_simple_step, val/loss")
    assert not out.exists()


@pytest.mark.parametrize("make, flags, message", [
    (lambda tmp: tmp / "absent", [], "run '{src}' does not exist"),
    (lambda tmp: (tmp / "empty_run").mkdir() or tmp / "empty_run", [], "run '{src}' has no csv/metrics.csv"),
    (lambda tmp: (tmp / "x.csv").write_text("a,b\n1,2\n") and tmp / "x.csv", [], "'{src}' is not a metrics CSV"),
    (lambda tmp: write_run(tmp, "r", 0.1), ["--out", "{tmp}/plot.jpg"], "--out {tmp}/plot.jpg: expected"),
    (lambda tmp: write_run(tmp, "r", 0.1), ["--labels", "a", "b"], "--labels: got 2 label(s) for 1 run(s)"),
])
def test_bad_input_is_one_line(tmp_path, plot, capsys, make, flags, message):
    src = make(tmp_path)
    flags = [f.format(tmp=tmp_path) for f in flags]
    assert plot.main([str(src), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.format(src=src, tmp=tmp_path) in err, err


def test_time_axis_needs_the_clock_and_resumed_sessions_form_one_timeline(tmp_path, plot, capsys):
    path = tmp_path / "old.csv"
    path.write_text("step,train/loss\n0,1.0\n1,0.5\n")
    assert plot.main([str(path), "--x", "time", "--out", str(tmp_path / "p.png")]) == 2
    assert "run 'old' (" in capsys.readouterr().err and not (tmp_path / "p.png").exists()
    # a run resumed at step 20 after logging up to 39: the abandoned steps 20..39 of session 0 are not drawn
    run = write_run(tmp_path, "resumed", 0.05, sessions=((0, 40), (20, 30)))
    (loaded,) = plot.load_runs([str(run)], None)
    steps, values = loaded.metrics["train/loss_simple_step"]
    assert steps.tolist() == list(range(30))
    assert plot.x_values(loaded, np.array([9.0, 9.5]), "time").tolist() == [19.0, 20.0]


def test_running_mean(plot):
    module = plot
    values = np.array([1.0, 3.0, 5.0, 7.0])
    assert module.running_mean(values, 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert module.running_mean(values, 10).tolist() == [1.0, 2.0, 3.0, 4.0]
    assert module.running_mean(values, 1) is values


def test_labels_are_run_names_without_the_timestamp_when_they_stay_distinct(tmp_path, plot):
    a = tmp_path / "2024-01-01T00-00-00_ae-f4" / "csv" / "metrics.csv"
    b = tmp_path / "2024-01-02T00-00-00_ae-f8" / "csv" / "metrics.csv"
    c = tmp_path / "2024-01-03T00-00-00_ae-f8" / "metrics.csv"
    assert plot.default_labels([a, b]) == ["ae-f4", "ae-f8"]
    assert plot.default_labels([b, c]) == ["2024-01-02T00-00-00_ae-f8", "2024-01-03T00-00-00_ae-f8"]
    assert plot.default_labels([a, a, tmp_path / "x.csv"]) == ["ae-f4", "ae-f4 #2", "x"]
