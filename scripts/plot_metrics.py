"""Draw loss and metric curves of one or several main.py runs into one PNG (matplotlib, Agg backend).

    python scripts/plot_metrics.py logs/<run>                                 # losses and val/* metrics
    python scripts/plot_metrics.py logs/<run a> logs/<run b> --metrics train/loss_simple_step 'val/fid@*' \\
        --x time --smooth 20 --logy --out docs/metrics_plot.png

A run is a main.py run directory (its `csv/metrics.csv`, written by every run) or a metrics CSV file. Each
metric (a column name or a glob pattern) gets one subplot, each run one line labelled with its name. `--x time`
draws against training wall time (`time/train_seconds`, validation and image logging excluded); `--smooth N`
draws the running mean of the last N points over the raw curve (curves of fewer than 2N points, such as
validation metrics, stay raw). It prints the last and the lowest value of every
curve, and writes the figure atomically.
"""
from __future__ import annotations

import argparse
import fnmatch
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ldm.inference import ScriptError, run_cli  # noqa: E402
from ldm.training.clock import TRAIN_SECONDS  # noqa: E402
from ldm.training.csv_logger import read_metrics_csv, train_seconds_at  # noqa: E402
from ldm.util import atomic_path  # noqa: E402

DEFAULT_METRICS = ("*loss*", "val/*")
CSV_IN_RUN = os.path.join("csv", "metrics.csv")
FORMATS = ("png", "svg", "pdf")
RUN_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d_")  # main.py's <now>_ prefix


@dataclass
class Run:
    """One run's curves: its label and {metric: (steps, values)}."""

    label: str
    path: Path
    metrics: dict[str, tuple[np.ndarray, np.ndarray]]


def get_parser() -> argparse.ArgumentParser:
    """The script's flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("runs", nargs="+", help="main.py run directories (logs/<run>) or metrics CSV files")
    add("--metrics", nargs="+", default=None, metavar="NAME",
        help=f"metric names or glob patterns, one subplot each (default: {' '.join(DEFAULT_METRICS)})")
    add("--x", choices=("step", "time"), default="step", help="x axis: logging step or training wall time")
    add("--smooth", type=int, default=1, metavar="N", help="running mean over the last N points (1: raw curves)")
    add("--logy", action="store_true", help="logarithmic y axes")
    add("--labels", nargs="+", default=None, help="line labels, one per run (default: the run names)")
    add("--out", default="metrics.png", help="output image (.png, or .svg/.pdf)")
    add("--cols", type=int, default=3, help="subplots per row")
    return parser


def csv_path(source: str) -> Path:
    """The metrics CSV of a run directory or the CSV file itself; a ScriptError when there is none."""
    path = Path(source)
    if path.is_dir():
        for candidate in (path / CSV_IN_RUN, path / "metrics.csv"):
            if candidate.is_file():
                return candidate
        raise ScriptError(f"run '{source}' has no {CSV_IN_RUN}; expected a main.py run directory (logs/<run>) "
                          "or a metrics CSV file")
    if not path.is_file():
        raise ScriptError(f"run '{source}' does not exist; expected a main.py run directory or a metrics CSV file")
    return path


def run_label(path: Path) -> str:
    """The run's name: the run directory of `<run>/csv/metrics.csv`, else the file's folder or stem."""
    if path.name == "metrics.csv":
        parent = path.parent
        return (parent.parent if parent.name == "csv" else parent).resolve().name
    return path.stem


def default_labels(paths: Sequence[Path]) -> list[str]:
    """The run names, without main.py's timestamp prefix when the names stay distinct, made unique with #2, ..."""
    names = [run_label(path) for path in paths]
    short = [RUN_TIMESTAMP.sub("", name) or name for name in names]
    if len(set(short)) == len(set(names)):
        names = short
    seen: dict[str, int] = {}
    labels = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return labels


def load_runs(sources: Sequence[str], labels: Sequence[str] | None) -> list[Run]:
    """Read every run's CSV; labels default to the run names (`default_labels`)."""
    if labels is not None and len(labels) != len(sources):
        raise ScriptError(f"--labels: got {len(labels)} label(s) for {len(sources)} run(s)")
    paths = [csv_path(source) for source in sources]
    runs = []
    for path, label in zip(paths, labels or default_labels(paths)):
        try:
            metrics = read_metrics_csv(path)
        except (ValueError, UnicodeDecodeError, OSError) as err:
            raise ScriptError(str(err).splitlines()[0] if str(err) else f"'{path}' cannot be read") from err
        runs.append(Run(label, path, metrics))
    return runs


def select_metrics(runs: Sequence[Run], patterns: Sequence[str] | None) -> list[str]:
    """The metrics to draw, in pattern order: every column of any run that a pattern matches (the clock itself
    only when named). A pattern that matches nothing is an error listing the metrics that exist."""
    available = sorted({name for run in runs for name in run.metrics})
    chosen: list[str] = []
    for pattern in patterns or DEFAULT_METRICS:
        matches = [name for name in available if fnmatch.fnmatchcase(name, pattern)
                   and (name != TRAIN_SECONDS or pattern == TRAIN_SECONDS)]
        if not matches and patterns:
            names = ", ".join(run.label for run in runs)
            raise ScriptError(f"--metrics '{pattern}': no such metric in {names}; metrics there: "
                              f"{', '.join(available) or '(none)'}")
        chosen.extend(name for name in matches if name not in chosen)
    if not chosen:
        raise ScriptError(f"no metric matches the default patterns {' '.join(DEFAULT_METRICS)}; pick some with "
                          f"--metrics from: {', '.join(available) or '(none)'}")
    return chosen


def running_mean(values: np.ndarray, n: int) -> np.ndarray:
    """Mean of the last `n` values at every point (fewer at the start)."""
    if n <= 1 or len(values) == 0:
        return values
    sums = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), n)
    return (sums[1:] - sums[np.arange(len(values)) + 1 - counts]) / counts


def x_values(run: Run, steps: np.ndarray, axis: str) -> np.ndarray:
    """Steps, or training seconds at those steps."""
    if axis == "step":
        return steps
    try:
        return train_seconds_at(run.metrics, steps)
    except KeyError:
        raise ScriptError(f"--x time: run '{run.label}' ({run.path}) has no {TRAIN_SECONDS} column (written by "
                          "ldm.training.clock.TrainClock); use --x step") from None


def time_unit(max_seconds: float) -> tuple[str, float]:
    """A readable unit for a time axis reaching `max_seconds`."""
    if max_seconds <= 180:
        return "s", 1.0
    if max_seconds <= 3 * 3600:
        return "min", 60.0
    return "h", 3600.0


def draw(runs: Sequence[Run], metrics: Sequence[str], axis: str, smooth: int, logy: bool, cols: int) -> Figure:
    """One subplot per metric, one line per run."""
    cols = max(1, min(cols, len(metrics)))
    rows = math.ceil(len(metrics) / cols)
    figure = Figure(figsize=(4.6 * cols, 3.3 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    curves = {(run.label, m): (x_values(run, run.metrics[m][0], axis), run.metrics[m][1])
              for run in runs for m in metrics if m in run.metrics}
    longest = max((float(x.max()) for x, _ in curves.values() if len(x)), default=0.0)
    unit, scale = time_unit(longest) if axis == "time" else ("", 1.0)
    colors = {run.label: f"C{i % 10}" for i, run in enumerate(runs)}
    for i, metric in enumerate(metrics):
        ax = figure.add_subplot(rows, cols, i + 1)
        for run in runs:
            if (run.label, metric) not in curves:
                continue
            x, y = curves[(run.label, metric)]
            x = x / scale
            marker = "o" if len(y) <= 30 else None
            if smooth > 1 and len(y) >= 2 * smooth:  # sparse curves (validation) are drawn as they are
                ax.plot(x, y, color=colors[run.label], alpha=0.25, linewidth=0.8)
                y = running_mean(y, smooth)
            ax.plot(x, y, color=colors[run.label], label=run.label, marker=marker, markersize=3, linewidth=1.3)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("step" if axis == "step" else f"training time ({unit})", fontsize=9)
        if logy:
            ax.set_yscale("log", nonpositive="mask")
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7)
    return figure


def print_summary(runs: Sequence[Run], metrics: Sequence[str]) -> None:
    """Points, last and lowest value of every curve."""
    width = max(len(m) for m in metrics)
    for metric in metrics:
        for run in runs:
            if metric in run.metrics:
                values = run.metrics[metric][1]
                print(f"{metric:<{width}}  {run.label}: {len(values)} points, last {values[-1]:.6g}, "
                      f"min {np.nanmin(values):.6g}")


def main_body(args: argparse.Namespace) -> None:
    """Read the runs, draw the figure, write it atomically."""
    if args.smooth < 1:
        raise ScriptError(f"--smooth {args.smooth}: expected a window of at least 1 point")
    fmt = Path(args.out).suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ScriptError(f"--out {args.out}: expected a file name ending in {', '.join('.' + f for f in FORMATS)}")
    runs = load_runs(args.runs, args.labels)
    metrics = select_metrics(runs, args.metrics)
    figure = draw(runs, metrics, args.x, args.smooth, args.logy, args.cols)
    with atomic_path(args.out) as tmp:
        figure.savefig(tmp, format=fmt, dpi=110)
    print_summary(runs, metrics)
    print(f"wrote {args.out} ({len(metrics)} metric(s), {len(runs)} run(s))")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one `error: ...` line and exit status 2 for a user mistake."""
    return run_cli(get_parser(), main_body, argv)


if __name__ == "__main__":
    sys.exit(main())
