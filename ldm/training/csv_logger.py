"""A CSVLogger whose metrics.csv survives a resume: the next session appends to it instead of deleting it.

Lightning's CSVLogger removes an existing `metrics.csv` when its writer starts, so resuming a run in its own
directory would lose the curves of every earlier session. `AppendingCSVLogger` keeps the file, adopts its header
and appends; a new column rewrites the file (atomically) with the wider header. Every row carries a `session`
column (0, then 1 for the first resume, ...): a resumed session starts from a checkpoint, so the rows an earlier
session logged at or after the step where the new session begins describe training that was abandoned.
`session_timeline` applies that rule; `read_metrics_csv` reads a file through it into one series per column
(`scripts/plot_metrics.py` draws them).
"""
from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from pytorch_lightning.core.saving import save_hparams_to_yaml
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from ldm.training.clock import TRAIN_SECONDS
from ldm.util import atomic_path

logger = logging.getLogger(__name__)

SESSION = "session"
STEP = "step"
BOOKKEEPING = ("step", "epoch", SESSION)  # columns that are not metrics


def _session_of(row: Mapping[str, Any]) -> int:
    value = row.get(SESSION)
    return int(float(value)) if value not in (None, "") else 0


def session_timeline(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows of an appended metrics.csv (dicts with `step` and maybe `session`) as one timeline: when a
    new session begins at step s, the earlier sessions' rows at steps >= s are dropped (the new session
    resumed from a checkpoint at s and logs those steps again). Rows without a session count as session 0."""
    timeline: list[Mapping[str, Any]] = []
    current = None
    for row in rows:
        session = _session_of(row)
        if current is not None and session != current and row.get("step") not in (None, ""):
            start = float(row["step"])
            timeline = [r for r in timeline if r.get("step") in (None, "") or float(r["step"]) < start]
        current = session
        timeline.append(row)
    return timeline


def read_metrics_csv(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every metric column of a metrics.csv as (steps, values) float arrays in timeline order (`session_timeline`).

    Empty cells are skipped; a row with the wrong number of cells (a write cut short) is ignored. Raises
    ValueError naming the file when it is not a CSV with a `step` column."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        fields = list(reader.fieldnames or [])
        if STEP not in fields:
            raise ValueError(f"'{path}' is not a metrics CSV: it has no 'step' column (columns: {', '.join(fields)})")
        rows = [row for row in reader if None not in row and None not in row.values()]
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in session_timeline(rows):
        if row[STEP] == "":
            continue
        for key, value in row.items():
            if key in BOOKKEEPING or value == "":
                continue
            try:
                number = float(value)
            except ValueError:
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(float(row[STEP]))
            values.append(number)
    return {key: (np.asarray(s), np.asarray(v)) for key, (s, v) in series.items()}


def train_seconds_at(metrics: Mapping[str, tuple[np.ndarray, np.ndarray]], steps: np.ndarray) -> np.ndarray:
    """The training time (`time/train_seconds`, logged by TrainClock) at `steps`, interpolated between the
    steps where it was logged (validation and evaluation rows carry a step but no time)."""
    if TRAIN_SECONDS not in metrics:
        raise KeyError(TRAIN_SECONDS)
    known_steps, seconds = metrics[TRAIN_SECONDS]
    return np.interp(steps, known_steps, seconds)


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV ExperimentWriter, appending to an existing metrics.csv; every rewrite is atomic."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir=log_dir)
        self.session = 0
        if os.path.isfile(self.metrics_file_path):
            self._drop_partial_last_line()
            with open(self.metrics_file_path, newline="") as handle:
                reader = csv.DictReader(handle)
                sessions = [_session_of(row) for row in reader]
                self.metrics_keys = list(reader.fieldnames or [])
            self.session = max(sessions, default=-1) + 1
            logger.info("appending metrics to %s (session %d)", self.metrics_file_path, self.session)

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        """Record one row, tagged with this session's number."""
        super().log_metrics({**metrics_dict, SESSION: self.session}, step)

    def _check_log_dir_exists(self) -> None:
        """Keep what an earlier session wrote (Lightning deletes metrics.csv here)."""

    def _drop_partial_last_line(self) -> None:
        """Cut a last row that a killed writer left without its newline, so the next row starts on its own line."""
        with open(self.metrics_file_path, "rb+") as handle:
            data = handle.read()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                logger.warning("%s ends in an incomplete row (an interrupted write); dropping it",
                               self.metrics_file_path)
                handle.truncate(keep)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        """Rewrite the file with a wider header, through a temporary file, so a crash never loses the old rows."""
        with open(self.metrics_file_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        with atomic_path(self.metrics_file_path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)

    def log_hparams(self, params: dict[str, Any]) -> None:
        """Record hparams and write hparams.yaml atomically."""
        self.hparams.update(params)
        path = os.path.join(self.log_dir, self.NAME_HPARAMS_FILE)
        with atomic_path(path) as tmp:
            save_hparams_to_yaml(tmp, self.hparams)


class AppendingCSVLogger(CSVLogger):
    """`pytorch_lightning.loggers.CSVLogger` (same arguments) that appends to `<save_dir>/<name>/<version>/metrics.csv`
    when it exists, so a resumed run keeps one file with all its sessions."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        """The writer, created on first use (rank 0 only)."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
