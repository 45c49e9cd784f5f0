"""The web UI's one loaded model: models are named by path (a main.py run, a checkpoint inside one, or a config +
checkpoint pair), one is loaded at a time, the previous one is released before the next is read, and a job holds
the model (and can be cancelled from its own session) while it samples."""
from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ldm import inference as inf

logger = logging.getLogger(__name__)


class Cancelled(Exception):
    """The job's session pressed cancel; raised from the progress callback, so the sampler stops at that step."""

    def __init__(self, done: int, total: int):
        super().__init__(f"cancelled after step {done} of {total}")
        self.done, self.total = done, total


@dataclass(frozen=True)
class ModelSpec:
    """A model the UI can load: `path` is a run directory or a checkpoint (inside a run unless `config` is given)."""

    path: str
    config: str | None = None

    def files(self) -> tuple[list[str], str]:
        """(config files, checkpoint), checked to exist (ldm.inference.resolve_model_files)."""
        if self.config:
            return inf.resolve_model_files(self.config, self.path)
        return inf.resolve_model_files(None, None, resume=self.path)


@dataclass
class Loaded:
    """The loaded model, the spec it came from and its checkpoint file."""

    model: Any
    spec: ModelSpec
    ckpt: str


class ModelSlot:
    """Holds at most one model. `load` releases the current one first; `job` lends it to one job at a time."""

    def __init__(self, device: torch.device, use_ema: bool = False):
        self.device, self.use_ema = device, use_ema
        self.loaded: Loaded | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._session: str | None = None
        self._running = False

    def load(self, spec: ModelSpec) -> Loaded:
        """Load `spec` (waiting for a running job to end); the previous model is released before the new one is
        read. Bad paths are reported before anything is released."""
        files, ckpt = spec.files()
        with self._lock:
            self._release()
            logger.info("loading %s (%s)", ckpt, ", ".join(files))
            _, model = inf.load_model(files, ckpt, self.device, use_ema=self.use_ema)
            self.loaded = Loaded(model, spec, ckpt)
            return self.loaded

    def _release(self) -> None:
        """Drop the model and give its memory back (the CUDA cache included)."""
        if self.loaded is None:
            return
        logger.info("releasing %s", self.loaded.ckpt)
        self.loaded = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def job(self, session: str | None) -> Iterator[Loaded]:
        """The loaded model, held for one job of `session` (other jobs wait); a user error when none is loaded."""
        with self._lock:
            if self.loaded is None:
                raise inf.ScriptError("no model is loaded; choose one under Model and press Load")
            self._stop.clear()
            self._session, self._running = session, True
            try:
                yield self.loaded
            finally:
                self._session, self._running = None, False

    @property
    def busy(self) -> bool:
        """Whether a job holds the model now."""
        return self._running

    def cancel(self, session: str | None) -> bool:
        """Ask the running job to stop at its next step if it belongs to `session`; whether one did."""
        if not self._running or self._session != session:
            return False
        self._stop.set()
        return True

    def check_cancelled(self, done: int, total: int) -> None:
        """Raise Cancelled when the running job was asked to stop (called after every sampler step)."""
        if self._stop.is_set():
            raise Cancelled(done, total)
