"""What the engine tests share: a toy model with ZeRO's awkward cases, and a one-rank process
group for engines built outside Ray Train."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest
import torch


class Toy(torch.nn.Module):
    """Shapes that do not divide by 2 (uneven ZeRO partitions), a frozen parameter (outside
    ZeRO's optimizer shards) and two parameter groups (weight decay and none)."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = torch.nn.Parameter(torch.randn(5), requires_grad=False)
        self.fc1 = torch.nn.Linear(7, 13)
        self.norm = torch.nn.LayerNorm(13)
        self.fc2 = torch.nn.Linear(13, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.norm(self.fc1(x))) + self.frozen.sum()
        return torch.nn.functional.mse_loss(self.fc2(h), y)


@contextlib.contextmanager
def single_rank() -> Iterator[None]:
    """The environment of one gloo rank on a free loopback port, as a worker outside Ray Train
    (a benchmark or notebook) has; ``Engine.build`` sets the group up from it, and it stays
    (DeepSpeed holds on to it); the environment is restored afterwards."""
    if torch.distributed.is_initialized():
        yield
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.MonkeyPatch.context() as env:
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
            env.setenv(key, value)
        yield
