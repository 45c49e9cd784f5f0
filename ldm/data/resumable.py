"""A DataLoader over a `ShardStream` that knows where every reader stands, for exact mid-epoch resume in Lightning.

Lightning 2.x saves `state_dict()` of every training DataLoader that has `state_dict`/`load_state_dict` (the
`_Stateful` protocol) into the checkpoint (`loops.fit_loop.state_dict.combined_loader`) and hands it back to
`load_state_dict` when a run resumes, before the first batch is drawn. This loader's state is, for each process
(rank) and each stream (DataLoader worker), the `Position` after the last batch training received from it, plus
which stream comes next. Positions travel with the batches from the workers, so batches that workers prefetched but
training never saw are not counted. Lightning does not prefetch from a loader whose length it knows, so `__len__`
is always defined (a nominal epoch; an unbounded stream reports `UNBOUNDED`).

Worker w of a fresh iterator serves stream (w + next stream) mod workers: the DataLoader hands out worker 0's batch
first, so the round robin over streams continues across Lightning epochs and restarts exactly where it stopped.

Only rank 0 writes the checkpoint, so `state_dict()` gathers the positions of all ranks (every process calls it
while saving). `local_state_only()` marks a save that only one process makes (an emergency save after an
exception); ranks missing from such a state restart at the beginning of their next data epoch, with a warning.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ldm.data.shards import START, Position, ShardStream
from ldm.util import ConfigError

logger = logging.getLogger(__name__)

UNBOUNDED = 2**62  # the length of a stream whose epoch size is unknown (Lightning then never ends an epoch)
STATE_VERSION = 1
MAX_LISTED_BAD_SAMPLES = 1000
_LOCAL_ONLY = [False]
# Lightning warns about any IterableDataset loader with a length; this one's length is exact by construction
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


@contextlib.contextmanager
def local_state_only() -> Iterator[None]:
    """Within this block `ShardLoader.state_dict()` makes no collective call (a save by one process alone)."""
    _LOCAL_ONLY.append(True)
    try:
        yield
    finally:
        _LOCAL_ONLY.pop()


def collectives_allowed() -> bool:
    """False inside `local_state_only()` (a save only this process makes)."""
    return not _LOCAL_ONLY[-1]


def gather_from_ranks(local: Any, rank: int, world: int) -> list[Any]:
    """Every rank's `local` (all_gather_object), or only this rank's (None elsewhere) inside `local_state_only()`
    or without an initialised process group."""
    if world > 1 and collectives_allowed() and dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, local)
        return gathered
    return [local if r == rank else None for r in range(world)]


def _keep(item: Any) -> Any:
    return item


class DataReport:
    """What the readers skipped: corrupt samples per shard (and which), unreadable shards, filtered samples."""

    def __init__(self, name: str = "train"):
        self.name = name
        self.bad_per_shard: Counter = Counter()
        self.bad_samples: list[list[str]] = []
        self.bad_shards: dict[str, str] = {}
        self.filtered: Counter = Counter()

    def add(self, events: dict[str, Any]) -> None:
        """Count (and log) the events a batch brought along."""
        for url, key, reason in events["bad_samples"]:
            self.bad_per_shard[url] += 1
            if len(self.bad_samples) < MAX_LISTED_BAD_SAMPLES:
                self.bad_samples.append([url, key, reason])
            logger.warning("%s data: skipped sample %s of shard %s: %s (%d skipped in this shard)", self.name, key,
                           url, reason, self.bad_per_shard[url])
        for url, reason in events["bad_shards"]:
            if url not in self.bad_shards:
                self.bad_shards[url] = reason
                logger.warning("%s data: shard %s %s; going on without it", self.name, url, reason)
        self.filtered.update(events["filtered"])

    @property
    def num_bad_samples(self) -> int:
        """Corrupt samples skipped so far."""
        return sum(self.bad_per_shard.values())

    def state_dict(self) -> dict[str, Any]:
        """Plain data (checkpoints are read with weights_only=True)."""
        return {"bad_per_shard": dict(self.bad_per_shard), "bad_samples": [list(s) for s in self.bad_samples],
                "bad_shards": dict(self.bad_shards), "filtered": dict(self.filtered)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue counting from a saved report."""
        self.bad_per_shard = Counter(state.get("bad_per_shard", {}))
        self.bad_samples = [list(s) for s in state.get("bad_samples", [])]
        self.bad_shards = dict(state.get("bad_shards", {}))
        self.filtered = Counter(state.get("filtered", {}))


class ShardLoader(DataLoader):
    """DataLoader (batch_size=None: the stream batches) with `state_dict`/`load_state_dict` for exact resume.

    `epoch_length` is the number of batches of a Lightning epoch on each process (default: `UNBOUNDED` for a
    repeating stream, no length for a single pass).
    `topology=(rank, world_size)` overrides the one read from torch.distributed (tests, tools).
    """

    def __init__(self, dataset: ShardStream, num_workers: int = 0, epoch_length: int | None = None,
                 name: str = "train", topology: tuple[int, int] | None = None, **kwargs: Any):
        kwargs.pop("persistent_workers", None)  # a persistent worker would go on from its own, prefetched place
        # each iterator draws a base seed: from a private generator, so that training's random stream does not
        # depend on when Lightning starts an iterator (epochs, resumes); the order uses per-sample seeds anyway
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        super().__init__(dataset, batch_size=None, num_workers=num_workers, collate_fn=_keep,
                         persistent_workers=False, **kwargs)
        if epoch_length is None:
            epoch_length = UNBOUNDED if dataset.repeat else None
        self.epoch_length = None if epoch_length is None else int(epoch_length)
        if self.epoch_length is not None and self.epoch_length < 1:
            raise ConfigError(f"{name}: epoch_length must be a positive number of batches, got {epoch_length!r}")
        self.name, self.topology_override = name, topology
        self.report = DataReport(name)
        self._positions: dict[int, Position] = {}
        self._next_stream = 0

    @property
    def num_streams(self) -> int:
        """One stream per worker (one in the main process without workers)."""
        return max(1, self.num_workers)

    def topology(self) -> tuple[int, int]:
        """(rank, world_size) of this process."""
        if self.topology_override is not None:
            return self.topology_override
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        if self.epoch_length is None:  # one pass of unknown length: Lightning then reads until the end
            raise TypeError(f"the {self.name} stream has no length")
        return self.epoch_length

    def _prepare_dataset(self) -> None:
        dataset: ShardStream = self.dataset  # type: ignore[assignment]
        dataset.rank, dataset.world_size = self.topology()
        dataset.num_streams, dataset.stream_offset = self.num_streams, self._next_stream
        dataset.positions = dict(self._positions)
        dataset.known_bad_shards = set(self.report.bad_shards)
        if dataset.repeat and len(dataset.urls) < dataset.num_slots:
            raise ConfigError(f"{self.name} data: {len(dataset.urls)} shard(s) cannot feed {dataset.num_slots} readers "
                             f"({dataset.world_size if dataset.split_by_rank else 1} process(es) x {self.num_streams} "
                             "stream(s)); use at least as many shards as readers, or fewer num_workers")

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        self._prepare_dataset()
        iterator = super().__iter__()
        try:
            for batch, meta in iterator:
                self._positions[meta["stream"]] = Position(*meta["position"])
                self._next_stream = (meta["stream"] + 1) % self.num_streams
                self.report.add(meta["events"])
                if batch is not None:
                    yield batch
        finally:
            del iterator  # shuts the workers down

    # ------------------------------------------------------------------ state
    def fingerprint(self) -> dict[str, Any]:
        """What the order depends on; a state saved under another fingerprint cannot resume exactly."""
        dataset: ShardStream = self.dataset  # type: ignore[assignment]
        rank, world = self.topology()
        return {"shards": hashlib.sha1("\n".join(dataset.urls).encode()).hexdigest(), "num_shards": len(dataset.urls),
                "world_size": world if dataset.split_by_rank else 1, "streams": self.num_streams,
                "batch_size": dataset.batch_size, "seed": dataset.seed, "shuffle": dataset.shuffle,
                "shard_shuffle": dataset.shard_shuffle}

    def _local_state(self) -> dict[str, Any]:
        return {"positions": {int(s): list(p) for s, p in self._positions.items()}, "report": self.report.state_dict()}

    def state_dict(self) -> dict[str, Any]:
        """Positions of every rank's streams (gathered to every process), the next stream, the skip report."""
        rank, world = self.topology()
        ranks = gather_from_ranks(self._local_state(), rank, world)
        return {"version": STATE_VERSION, "fingerprint": self.fingerprint(), "next_stream": self._next_stream,
                "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume every stream of this rank where the saved run left it (see the module docstring)."""
        rank, _ = self.topology()
        ranks = state.get("ranks") or []
        saved = [Position(*p) for r in ranks if r for p in r["positions"].values()]
        next_epoch = Position(max((p.epoch for p in saved), default=-1) + 1, 0, 0, 0)
        mine = ranks[rank] if rank < len(ranks) else None
        if state.get("fingerprint") != self.fingerprint():
            changed = sorted(k for k, v in self.fingerprint().items() if state.get("fingerprint", {}).get(k) != v)
            logger.warning("%s data: the checkpoint's data order was made with other %s; cannot resume mid-epoch, "
                           "starting data epoch %d", self.name, ", ".join(changed), next_epoch.epoch)
            self._positions = {s: next_epoch for s in range(self.num_streams)}
            self._next_stream = 0
        elif mine is None:
            logger.warning("%s data: the checkpoint has no data position for rank %d (saved by one process alone); "
                           "it starts data epoch %d", self.name, rank, next_epoch.epoch)
            self._positions = {s: next_epoch for s in range(self.num_streams)}
            self._next_stream = int(state.get("next_stream", 0))
        else:
            self._positions = {int(s): Position(*p) for s, p in mine["positions"].items()}
            self._next_stream = int(state.get("next_stream", 0))
        if mine is not None:
            self.report.load_state_dict(mine.get("report", {}))
        logger.info("%s data: resuming at %s", self.name,
                    {s: tuple(self._positions.get(s, START)) for s in range(self.num_streams)})

