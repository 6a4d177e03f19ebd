"""What a training worker asks once (rank, world size, device) and the collectives: identities
in a single process, and over two real gloo processes."""

from __future__ import annotations

import json
import os

import torch

from service.runtime.worker import (
    all_gather_tensors,
    all_reduce_max,
    all_reduce_sum,
    worker_context,
    world_size,
)
from tests.fixtures.mlflow_server import free_port


def test_outside_ray_train_a_worker_is_the_only_one_on_the_cpu():
    ctx = worker_context()
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (0, 1, 0)
    assert ctx.device == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))


def test_without_a_process_group_the_collectives_return_this_workers_values():
    assert not torch.distributed.is_initialized()
    values = torch.tensor([1.5, 2.0])
    assert torch.equal(all_reduce_sum(values), values)
    assert all_reduce_max(7, torch.device("cpu")) == 7
    rows = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(all_gather_tensors(rows), rows)
    assert world_size() == 1


def _collectives(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    values = torch.tensor([1.0, 10.0]) * (rank + 1)
    summed = all_reduce_sum(values)
    # Uneven leading lengths: rank 0 has 1 row, rank 1 has 3.
    rows = torch.full((1 + 2 * rank, 2), float(rank))
    result = {
        "sum": summed.tolist(), "input_after": values.tolist(),
        "max": all_reduce_max(5 if rank == 0 else 3, torch.device("cpu")),
        "gathered": all_gather_tensors(rows).tolist(),
        "world": world_size(),
    }
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


def test_over_two_gloo_workers_the_collectives_combine_every_workers_values(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_collectives, args=(free_port(), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(results):
        assert result["sum"] == [3.0, 30.0]  # 1x + 2x the values
        assert result["input_after"] == [1.0 * (rank + 1), 10.0 * (rank + 1)]  # the input is left alone
        assert result["max"] == 5
        assert result["gathered"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]  # rank order, no padding
        assert result["world"] == 2
