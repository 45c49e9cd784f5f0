"""Writing tar shards in the img2dataset layout: `00000.tar` (+ `00000_stats.json`, optionally `00000.parquet`).

A sample is a dict with `__key__` and one entry per member: `bytes` are stored as they are, `str` as UTF-8,
dicts and lists as JSON (`{"__key__": "000000000", "jpg": b"...", "txt": "a cat", "json": {...}}` becomes
`000000000.jpg`, `000000000.txt`, `000000000.json`). Every file is written under a temporary name and renamed.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from typing import Any

from ldm.util import atomic_path


def encode_member(value: Any) -> bytes:
    """The bytes of one tar member: bytes as they are, str as UTF-8, dict/list as JSON."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True).encode("utf-8")
    raise TypeError(f"cannot store a {type(value).__name__} in a shard; expected bytes, str, dict or list")


def write_shard(path: str | os.PathLike, samples: Iterable[dict[str, Any]], parquet: bool = False) -> int:
    """Write one shard (and its `_stats.json`, and with `parquet` its `.parquet` of the json metadata);
    returns the number of samples."""
    path = os.fspath(path)
    rows, count = [], 0
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = str(sample["__key__"])
            for ext, value in sample.items():
                if ext.startswith("__"):
                    continue
                data = encode_member(value)
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
            count += 1
            rows.append({"key": key, **(sample.get("json") or {})})
    stem = os.path.splitext(path)[0]
    with atomic_path(stem + "_stats.json") as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"count": count, "successes": count, "failed_to_download": 0}, handle)
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with atomic_path(stem + ".parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(rows), tmp)
    return count


def _chunks(samples: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_shards(samples: Iterable[dict[str, Any]], out_dir: str | os.PathLike, samples_per_shard: int = 1000,
                 parquet: bool = False) -> list[str]:
    """Shards `00000.tar`, `00001.tar`, ... of `samples_per_shard` samples each in `out_dir`; their paths."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for index, chunk in enumerate(_chunks(samples, samples_per_shard)):
        path = os.path.join(os.fspath(out_dir), f"{index:05d}.tar")
        write_shard(path, chunk, parquet=parquet)
        paths.append(path)
    return paths
