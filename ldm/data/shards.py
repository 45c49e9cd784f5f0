"""Tar shards in the webdataset / img2dataset layout, streamed in a deterministic order that resumes mid-epoch.

Layout: `00000.tar` holding `<key>.jpg|png|webp`, `<key>.txt`, `<key>.json`, ... (what img2dataset writes, with an
optional `00000.parquet` beside it). Shards are local paths, brace-expanded lists (`data/{00000..00099}.tar`) or
`pipe:` commands, opened and split into samples by the `webdataset` package (gopen, tar iteration, grouping by key).

Order. Data epoch e permutes the N shards with a generator seeded by (seed, e). Reader slot s of S = world_size x
streams (a stream is one DataLoader worker) reads the shards perm[s::S] one after the other, shuffles their samples in
consecutive windows of `shuffle` samples (each window's permutation seeded by where it starts), decodes them and
groups them into batches; then it goes on with its shards of epoch e + 1. Within an epoch every shard belongs to
exactly one slot, so no sample is read twice or left out. A slot's place in its stream is a `Position` (epoch, shard,
offset, taken); starting from one re-reads that shard's first `offset` samples without decoding them and produces
exactly the batches an uninterrupted reader would have produced next. Per-sample randomness (random crops, masks) is
seeded by (seed, epoch, shard url, key), never by a running generator, so it survives a restart too.

Corrupt samples are skipped and reported with the batch that follows them (`ReadEvents`); a shard that cannot be
opened or is truncated is reported once.
"""
from __future__ import annotations

import logging
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from ldm.util import ConfigError

logger = logging.getLogger(__name__)


class SampleRejected(Exception):
    """A sample that does not go into a batch: `corrupt` (undecodable, incomplete) or filtered out by metadata."""

    def __init__(self, reason: str, corrupt: bool = True):
        super().__init__(reason)
        self.reason, self.corrupt = reason, corrupt


class Position(NamedTuple):
    """Where a reader slot stands: data `epoch`, index `shard` into its shard list of that epoch, `offset` raw samples
    of that shard before the current shuffle window, and `taken` samples of that window already used."""

    epoch: int
    shard: int
    offset: int
    taken: int


START = Position(0, 0, 0, 0)


def expand_shards(shards: str | Sequence[str], tar_base: str | None = None, key: str = "shards") -> list[str]:
    """Every shard URL: each entry brace-expanded (`{00000..00009}`, `::` separated lists), `tar_base` prefixed."""
    entries = [shards] if isinstance(shards, str) else list(shards or [])
    urls: list[str] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise ConfigError(f"{key}: expected shard paths, brace patterns or pipe: commands, got {entry!r}")
        for url in expand_urls(entry.strip()):
            urls.append(url if not tar_base or url.startswith("pipe:") or "://" in url else _join(tar_base, url))
    if not urls:
        raise ConfigError(f"{key}: no shards given")
    return urls


def _join(base: str, url: str) -> str:
    return url if url.startswith("/") else base.rstrip("/") + "/" + url


class ReadEvents:
    """What went wrong while reading, collected in the reader and handed to the loader with the next batch."""

    def __init__(self, known_bad_shards: Iterable[str] = ()):
        self.known_bad = set(known_bad_shards)
        self.bad_samples: list[tuple[str, str, str]] = []
        self.bad_shards: list[tuple[str, str]] = []
        self.filtered: Counter = Counter()

    def shard_failed(self, url: str, reason: str) -> None:
        """Record a shard that could not be read (whole or in part), once per reader."""
        if url not in self.known_bad:
            self.known_bad.add(url)
            self.bad_shards.append((url, reason))

    def rejected(self, url: str, key: str, err: SampleRejected) -> None:
        """Record a corrupt sample (by shard and key) or count a filtered one (by reason)."""
        if err.corrupt:
            self.bad_samples.append((url, key, err.reason))
        else:
            self.filtered[err.reason] += 1

    def drain(self) -> dict[str, Any]:
        """The events since the last drain, as plain data (they travel from DataLoader workers)."""
        out = {"bad_samples": self.bad_samples, "bad_shards": self.bad_shards, "filtered": dict(self.filtered)}
        self.bad_samples, self.bad_shards, self.filtered = [], [], Counter()
        return out


class _TailReader:
    """A read-only stream that remembers its last 1024 bytes: a complete tar ends with two zero blocks, while
    Python's tarfile silently stops at a truncated header instead of reporting it."""

    def __init__(self, raw: Any):
        self.raw, self.tail = raw, b""

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if data:
            self.tail = (self.tail + data)[-1024:]
        return data

    def complete(self) -> bool:
        """Read to the end; whether the stream ended with the end-of-archive marker."""
        while self.read(1 << 16):
            pass
        return len(self.tail) == 1024 and not any(self.tail)

    def close(self) -> None:
        self.raw.close()


def read_shard(url: str, events: ReadEvents) -> Iterator[dict[str, Any]]:
    """The raw samples of one shard (`{'__key__', '__url__', ext: bytes}`); read failures go to `events`."""
    try:
        stream = _TailReader(gopen(url, "rb"))
    except Exception as err:  # noqa: BLE001 - any failure to open is reported, training goes on
        events.shard_failed(url, f"cannot be opened: {err}")
        return
    failures: list[BaseException] = []

    def handler(exn: BaseException) -> bool:
        failures.append(exn)
        return True

    count = 0
    try:
        for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=handler),
                                    handler=handler):
            count += 1
            yield sample
        if not failures and not stream.complete():
            failures.append(EOFError("the tar ends without its end-of-archive blocks"))
    finally:
        try:
            stream.close()
        except Exception as err:  # noqa: BLE001 - e.g. a pipe: command that exited with an error
            failures.append(err)
    if failures:
        what = "cannot be read" if count == 0 else f"is truncated or damaged after {count} samples"
        events.shard_failed(url, f"{what}: {_first_line(failures[0])}")


def _first_line(err: BaseException) -> str:
    text = str(err.args[0] if err.args else err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def sample_seed(seed: int, epoch: int, url: str, key: str) -> list[int]:
    """The seed of one sample's randomness: (seed, epoch, crc32 of shard url and key)."""
    return [int(seed), int(epoch), zlib.crc32(f"{url}\0{key}".encode())]


class ShardStream(IterableDataset):
    """Batches from tar shards in the order described in the module docstring (one stream per DataLoader worker).

    `process(raw_sample, seed)` turns a raw sample into an example dict or raises `SampleRejected`; `collate` makes
    a batch of `batch_size` examples. `shuffle` is the shuffle window in samples (0: the shards' own order, and no
    shard permutation unless `shard_shuffle`). `repeat` streams epoch after epoch (training); otherwise one epoch
    and a last partial batch. `split_by_rank=False` gives every process all shards. `ShardLoader` sets the
    topology and the start positions before each iteration.
    """

    def __init__(self, urls: Sequence[str], process: Callable[[dict, list[int]], dict], batch_size: int,
                 collate: Callable[[list[dict]], dict], seed: int = 0, shuffle: int = 0,
                 shard_shuffle: bool | None = None, repeat: bool = True, split_by_rank: bool = True):
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.urls = list(urls)
        self.process, self.collate = process, collate
        self.batch_size, self.seed, self.shuffle = int(batch_size), int(seed), max(0, int(shuffle))
        self.shard_shuffle = self.shuffle > 0 if shard_shuffle is None else bool(shard_shuffle)
        self.repeat, self.split_by_rank = bool(repeat), bool(split_by_rank)
        self.rank, self.world_size, self.num_streams, self.stream_offset = 0, 1, 1, 0
        self.positions: dict[int, Position] = {}
        self.known_bad_shards: set[str] = set()

    @property
    def num_slots(self) -> int:
        """Readers that share the shards of one epoch."""
        return self.num_streams * (self.world_size if self.split_by_rank else 1)

    def slot_of(self, stream: int) -> int:
        """The reader slot of this process's `stream`."""
        return (self.rank * self.num_streams if self.split_by_rank else 0) + stream

    def slot_shards(self, epoch: int, slot: int) -> list[int]:
        """Indices into `urls` that `slot` reads in data epoch `epoch`, in reading order."""
        n = len(self.urls)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shard_shuffle else np.arange(n)
        return [int(i) for i in order[slot::self.num_slots]]

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.num_streams:
            raise RuntimeError(f"ShardStream was set up for {self.num_streams} streams but runs in {workers} workers")
        stream = (worker + self.stream_offset) % workers
        return self._batches(stream, self.slot_of(stream), self.positions.get(stream, START))

    def _batches(self, stream: int, slot: int, start: Position) -> Iterator[tuple[dict, dict]]:
        """(batch, meta) pairs; meta holds the stream, the Position after the batch and the read events (a finite
        stream ends with a (None, meta) pair when no partial batch is left)."""
        events = ReadEvents(self.known_bad_shards)
        examples: list[dict] = []
        accepted, epoch, position = 0, start.epoch, start
        for raw, position in self._samples(slot, start, events):
            if position.epoch != epoch:
                if epoch != start.epoch or tuple(start[1:]) == (0, 0, 0):  # this iterator read that whole epoch
                    self._check_epoch_produced(accepted, epoch, slot)
                accepted, epoch = 0, position.epoch
            url, key = raw["__url__"], raw["__key__"]
            try:
                example = self.process(raw, sample_seed(self.seed, position.epoch, url, key))
            except SampleRejected as err:
                events.rejected(url, key, err)
                continue
            example.update(__key__=key, __url__=url, __epoch__=position.epoch)
            examples.append(example)
            accepted += 1
            if len(examples) == self.batch_size:
                yield self.collate(examples), self._meta(stream, position, events)
                examples = []
        if not self.repeat:  # the last partial batch; None just hands over the events after the last batch
            yield (self.collate(examples) if examples else None), self._meta(stream, position, events)

    def _check_epoch_produced(self, accepted: int, epoch: int, slot: int) -> None:
        if accepted == 0:
            raise RuntimeError(f"reader slot {slot}: every sample of its shards in data epoch {epoch} was corrupt or "
                               "filtered out; check the shards and the filters (min_size, max_pwatermark, ...)")

    @staticmethod
    def _meta(stream: int, position: Position, events: ReadEvents) -> dict[str, Any]:
        return {"stream": stream, "position": tuple(position), "events": events.drain()}

    def _samples(self, slot: int, start: Position, events: ReadEvents) -> Iterator[tuple[dict, Position]]:
        """Raw samples of `slot` from `start` on, each with the Position just after it."""
        epoch, shard, offset, taken = start
        while True:
            shards = self.slot_shards(epoch, slot)
            fresh, produced = (shard, offset, taken) == (0, 0, 0), False
            for window, (w_shard, w_offset) in self._windows(shards, shard, offset, events):
                order = self._window_order(len(window), epoch, slot, w_shard, w_offset)
                for j in range(taken, len(window)):
                    produced = True
                    yield window[order[j]], Position(epoch, w_shard, w_offset, j + 1)
                taken = 0
            if not self.repeat:
                return
            if fresh and not produced:  # streaming on would loop forever without a sample
                names = ", ".join(self.urls[i] for i in shards[:5]) + (", ..." if len(shards) > 5 else "")
                raise RuntimeError(f"reader slot {slot}: none of its {len(shards)} shards in data epoch {epoch} gave "
                                   f"a sample ({names or 'no shards'}); see the warnings above for why")
            epoch, shard, offset, taken = epoch + 1, 0, 0, 0

    def _window_order(self, size: int, epoch: int, slot: int, shard: int, offset: int) -> np.ndarray:
        if self.shuffle <= 1:
            return np.arange(size)
        return np.random.default_rng([self.seed, epoch, slot, shard, offset, 7]).permutation(size)

    def _windows(self, shards: list[int], shard: int, offset: int, events: ReadEvents
                 ) -> Iterator[tuple[list[dict], tuple[int, int]]]:
        """Consecutive windows of `shuffle` raw samples (1 without shuffling), each with its start (shard, offset)."""
        size = max(1, self.shuffle)
        window: list[dict] = []
        begin = (shard, offset)
        for raw, index, count in self._raw(shards, shard, offset, events):
            window.append(raw)
            if len(window) == size:
                yield window, begin
                window, begin = [], (index, count)
        if window:
            yield window, begin

    def _raw(self, shards: list[int], shard: int, offset: int, events: ReadEvents
             ) -> Iterator[tuple[dict, int, int]]:
        """(raw sample, shard index, samples read from that shard so far) from shard `shard`, sample `offset` on."""
        for index in range(shard, len(shards)):
            skip = offset if index == shard else 0
            count = 0
            for raw in read_shard(self.urls[shards[index]], events):
                count += 1
                if count > skip:
                    yield raw, index, count


def collate_examples(examples: list[dict[str, Any]], rename: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One batch dict from example dicts (the keys all share): tensors and arrays stacked, numbers as a tensor,
    everything else (captions, metadata dicts) as a list; `rename` adds other names for keys (the same objects)."""
    keys = set(examples[0]).intersection(*examples[1:])
    batch: dict[str, Any] = {}
    for key in sorted(keys):
        values = [example[key] for example in examples]
        first = values[0]
        if isinstance(first, (torch.Tensor, np.ndarray)):
            tensors = [torch.as_tensor(v) for v in values]
            shapes = {tuple(t.shape) for t in tensors}
            if len(shapes) > 1:
                raise ConfigError(f"batch key '{key}': examples of different shapes {sorted(shapes)} in one batch; "
                                 "resize/crop them to one size (image_transforms or size)")
            batch[key] = torch.stack(tensors)
        elif isinstance(first, (bool, int, float)) and not isinstance(first, str):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    for source, target in (rename or {}).items():
        batch[target] = batch[source]
    return batch
