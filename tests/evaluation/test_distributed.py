"""Shares of whole batches and gathered rows: every process ends with exactly the rows of one process, in order."""
import pytest
import torch

from ldm.evaluation.distributed import gather_rows, shard_batches


def simulate(n, batch_size, world):
    """Run shard + gather for every rank of a simulated process group; the gathered rows of each rank."""
    padded = []
    locals_ = []
    for rank in range(world):
        batches, per_rank = shard_batches(n, batch_size, rank, world)
        rows = torch.tensor([float(i) for batch in batches for i in batch]).reshape(-1, 1)
        locals_.append((rows, per_rank))
        gather_rows({"x": rows}, n, per_rank * batch_size, lambda t: padded.append(t) or t[None], world)
    stacked = torch.stack(padded) if padded else None  # one process gathers nothing
    return [gather_rows({"x": rows}, n, per_rank * batch_size, lambda t: stacked, world)["x"]
            for rows, per_rank in locals_]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 7, 8, 13])
def test_gathered_rows_are_the_single_process_rows(n, batch_size, world):
    for gathered in simulate(n, batch_size, world):
        assert gathered.flatten().tolist() == [float(i) for i in range(n)]


def test_each_sample_is_in_the_same_batch_whatever_the_world_size():
    single = shard_batches(10, 4)[0]
    split = [batch for rank in range(3) for batch in shard_batches(10, 4, rank, 3)[0]]
    assert split == single == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
