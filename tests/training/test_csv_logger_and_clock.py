"""The run's CSV logger (appends across resumed sessions, atomic header rewrites, one timeline) and the training
clock (validation and paused sections excluded, carried through checkpoints)."""
import csv
from types import SimpleNamespace

import pytest
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.trainer.states import TrainerFn

from ldm.training import clock as clock_module
from ldm.training.clock import TRAIN_SECONDS, TrainClock, paused
from ldm.training.csv_logger import AppendingCSVLogger, session_timeline


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def log_session(save_dir, rows, cls=AppendingCSVLogger):
    run_logger = cls(save_dir, name="", version="csv")
    for step, metrics in rows:
        run_logger.log_metrics(metrics, step=step)
        run_logger.save()
    run_logger.finalize("success")
    return run_logger.experiment.metrics_file_path


def test_a_resumed_session_appends_with_its_session_number(tmp_path):
    path = log_session(tmp_path, [(0, {"loss": 1.0}), (1, {"loss": 0.5})])
    assert path == str(tmp_path / "csv" / "metrics.csv")
    log_session(tmp_path, [(2, {"loss": 0.25, "val/loss": 0.3})])  # a new column: header rewritten
    rows = read_rows(path)
    assert [(r["step"], r["loss"], r["session"]) for r in rows] == [("0", "1.0", "0"), ("1", "0.5", "0"),
                                                                     ("2", "0.25", "1")]
    assert rows[0]["val/loss"] == "" and rows[2]["val/loss"] == "0.3"
    log_session(tmp_path, [(3, {"loss": 0.125})])
    assert [r["session"] for r in read_rows(path)] == ["0", "0", "1", "2"]
    assert not [p for p in (tmp_path / "csv").iterdir() if p.name != "metrics.csv"]  # no temp files left


def test_lightnings_own_csv_logger_would_have_lost_the_first_session(tmp_path):
    """Why AppendingCSVLogger exists: the stock writer deletes metrics.csv when a resumed run starts."""
    path = log_session(tmp_path, [(0, {"loss": 1.0})], cls=CSVLogger)
    log_session(tmp_path, [(1, {"loss": 0.5})], cls=CSVLogger)
    assert [r["step"] for r in read_rows(path)] == ["1"]


def test_an_incomplete_last_row_is_dropped_before_appending(tmp_path):
    path = log_session(tmp_path, [(0, {"loss": 1.0}), (1, {"loss": 0.5})])
    with open(path, "a") as handle:
        handle.write("2,0.2")  # a writer killed in the middle of a row
    log_session(tmp_path, [(2, {"loss": 0.25})])
    assert [(r["step"], r["loss"]) for r in read_rows(path)] == [("0", "1.0"), ("1", "0.5"), ("2", "0.25")]


def test_a_failed_header_rewrite_keeps_the_old_file(tmp_path, monkeypatch):
    path = log_session(tmp_path, [(0, {"loss": 1.0})])
    before = open(path).read()

    def fails(self, rows):
        raise OSError("disk full")

    run_logger = AppendingCSVLogger(tmp_path, name="", version="csv")
    run_logger.log_metrics({"new_metric": 1.0}, step=1)
    monkeypatch.setattr(csv.DictWriter, "writerows", fails)
    with pytest.raises(OSError, match="disk full"):
        run_logger.save()
    assert open(path).read() == before
    assert sorted(p.name for p in (tmp_path / "csv").iterdir()) == ["metrics.csv"]


def test_session_timeline_drops_the_steps_a_resumed_session_logs_again():
    rows = [{"step": s, "session": "0", "loss": s} for s in ("0", "1", "2", "3")]
    rows += [{"step": "", "session": "0", "note": "x"}]
    rows += [{"step": s, "session": "1", "loss": s} for s in ("2", "3", "4")]  # resumed from step 2
    rows += [{"step": "0", "session": "1", "val": 1}]  # a step counter of evaluation: no new session, kept
    timeline = session_timeline(rows)
    assert [(r["step"], r["session"]) for r in timeline] == [("0", "0"), ("1", "0"), ("", "0"), ("2", "1"),
                                                             ("3", "1"), ("4", "1"), ("0", "1")]
    plain = [{"step": "1"}, {"step": "0"}]  # a CSV without sessions is taken as it is
    assert session_timeline(plain) == plain


class FakeTime:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Module:
    def __init__(self):
        self.logged = []

    def log(self, name, value, **kwargs):
        self.logged.append((name, value, kwargs))


def test_train_clock_excludes_validation_and_paused_sections_and_resumes_from_a_checkpoint(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(clock_module.time, "perf_counter", fake)
    trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING), callbacks=[])
    clock, module = TrainClock(), Module()
    trainer.callbacks.append(clock)
    clock.on_validation_start(trainer, module)  # the sanity check runs before training: not counted
    fake.now += 50
    clock.on_validation_end(trainer, module)
    clock.on_train_start(trainer, module)
    fake.now += 10
    clock.on_train_batch_end(trainer, module, None, None, 0)
    assert module.logged[-1][:2] == (TRAIN_SECONDS, 10.0) and module.logged[-1][2]["on_step"] is True
    clock.on_validation_start(trainer, module)
    fake.now += 7
    with paused(trainer):  # nested in validation (e.g. the image logger): still one pause
        fake.now += 3
    fake.now += 1
    clock.on_validation_end(trainer, module)
    fake.now += 5
    with clock.paused():
        fake.now += 20
    assert clock.elapsed() == 15.0
    state = clock.state_dict()
    fake.now += 2
    clock.on_train_end(trainer, module)
    assert clock.elapsed() == 17.0
    fake.now += 1000  # after training nothing counts

    resumed = TrainClock()
    resumed.load_state_dict(state)
    resumed.on_train_start(trainer, module)
    fake.now += 4
    assert resumed.elapsed() == 19.0
    assert resumed.state_key == TrainClock().state_key != TrainClock(name="time/other").state_key


def test_every_run_gets_the_csv_logger_beside_its_first_logger(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger
    from omegaconf import OmegaConf

    from ldm.training.config import RunDir, UsageError
    from ldm.training.trainer import build_loggers

    run = RunDir(logdir=str(tmp_path / "run"), now="now")
    default = build_loggers(OmegaConf.create({}), run)
    assert [type(x) for x in default] == [TensorBoardLogger, AppendingCSVLogger]
    assert default[1].log_dir == str(tmp_path / "run" / "csv")
    tuned = build_loggers(OmegaConf.create({"csv_logger": {"params": {"flush_logs_every_n_steps": 7}}}), run)
    assert tuned[1]._flush_logs_every_n_steps == 7 and tuned[1].log_dir == default[1].log_dir
    assert [type(x) for x in build_loggers(OmegaConf.create({"csv_logger": None}), run)] == [TensorBoardLogger]
    # another first logger keeps the CSV beside it; one that already writes <logdir>/csv is not doubled
    other = build_loggers(OmegaConf.create({"logger": {"target": "pytorch_lightning.loggers.CSVLogger",
                                                       "params": {"name": "mine"}}}), run)
    assert [type(x) for x in other] == [CSVLogger, AppendingCSVLogger]
    assert other[0].save_dir == run.logdir  # the run directory is given to the user's logger
    same = build_loggers(OmegaConf.create({"logger": {"target": "pytorch_lightning.loggers.CSVLogger",
                                                      "params": {"name": "", "version": "csv"}}}), run)
    assert [type(x) for x in same] == [CSVLogger]
    with pytest.raises(UsageError, match="lightning.csv_logger: expected a target/params mapping or null"):
        build_loggers(OmegaConf.create({"csv_logger": "yes"}), run)
