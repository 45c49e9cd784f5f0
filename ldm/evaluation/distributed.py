"""Each process evaluates its share of the samples; per-sample rows (features, per-image scores) are gathered so
that every process holds exactly the rows one process would have computed, in the same order.

Samples are split in whole batches of `batch_size` consecutive indices, and each process takes a contiguous run of
batches: a sample is drawn and featurised in the same batch whatever the number of processes, so the gathered rows
equal those of a single process bit for bit.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

Gather = Callable[[torch.Tensor], torch.Tensor]  # all_gather: (rows, ...) -> (world, rows, ...)


def shard_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> tuple[list[list[int]], int]:
    """(this process's batches of sample indices, the most batches any process has)."""
    batches = [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]
    per_rank = math.ceil(len(batches) / world_size) if batches else 0
    return batches[rank * per_rank:(rank + 1) * per_rank], per_rank


def gather_rows(local: Mapping[str, torch.Tensor], n: int, rows_per_rank: int, gather: Gather | None = None,
                world_size: int = 1) -> dict[str, torch.Tensor]:
    """Every process's rows of each tensor, in sample order: local rows padded to `rows_per_rank`, all-gathered,
    laid end to end and cut to `n`."""
    if gather is None or world_size == 1:
        return {name: value[:n] for name, value in local.items()}
    out = {}
    for name, value in local.items():
        padded = torch.zeros((rows_per_rank, *value.shape[1:]), dtype=value.dtype, device=value.device)
        padded[:len(value)] = value
        gathered = gather(padded)
        out[name] = gathered.reshape(-1, *value.shape[1:])[:n].cpu()
    return out
