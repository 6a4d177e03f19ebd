"""``Engine.grad_norm``: the global 2-norm of the averaged, unscaled gradient of the last
optimizer step, at every ZeRO stage, with and without clipping, in fp32 and bf16, equal to the
norm a plain torch copy of the model computes for the same global batch.

Real DeepSpeed over gloo: one rank in this process (the default run), and two ranks in
``torch.multiprocessing`` worker processes (slow: each imports DeepSpeed), where the norm must
combine both workers' gradient partitions. Two micro-batches per step (gradient accumulation),
so the norm is the one of the step's averaged gradient, not of a micro-batch's.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

from tests.service.runtime.engines import Toy

STAGES = (0, 1, 2, 3)
ACCUM = 2
PER_MICRO = 3  # images per worker and micro-batch
# (precision, clip_grad): a clip far below the norm, so a norm read after clipping would show.
CASES = [("fp32", None), ("fp32", 1e-3), ("bf16", None)]


def global_batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    n = world * ACCUM * PER_MICRO
    return torch.randn(n, 7, generator=g), torch.randn(n, 3, generator=g) * 5


def micro_batch(x: torch.Tensor, y: torch.Tensor, rank: int, world: int, micro: int):
    """Rank ``rank``'s ``micro``-th micro-batch of the global batch."""
    start = (micro * world + rank) * PER_MICRO
    return x[start:start + PER_MICRO], y[start:start + PER_MICRO]


def reference_norm(precision: str, world: int) -> float:
    """The plain torch model on the whole global batch: the mean loss over all micro-batches of
    all workers (equal sizes: the global batch's mean), its gradient's 2-norm."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    model = Toy().to(dtype)
    x, y = global_batch(world)
    loss = model(x.to(dtype), y.to(dtype))
    loss.backward()
    grads = [p.grad.float() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def engine_norms(rank: int, world: int) -> dict[tuple[int, str, float | None], float | None]:
    """One optimizer step per stage and case on this rank; the engine's norm after it."""
    from service.config import PretrainConfig, with_overrides
    from service.runtime.engine import Engine

    out: dict[tuple[int, str, float | None], float | None] = {}
    x, y = global_batch(world)
    for stage in STAGES:
        for precision, clip in CASES:
            cfg = with_overrides(PretrainConfig(), {
                "dist.zero_stage": stage, "dist.num_workers": world, "train.clip_grad": clip,
                "train.batch_size_per_worker": PER_MICRO, "train.grad_accum_steps": ACCUM})
            torch.manual_seed(0)  # the reference's weights
            engine = Engine.build(Toy(), cfg, use_gpu=False, precision=precision, lr=1e-2)
            assert engine.grad_norm() is None  # no step yet
            boundaries = []
            for micro in range(ACCUM):
                xb, yb = micro_batch(x, y, rank, world, micro)
                loss = engine(xb.to(engine.dtype), yb.to(engine.dtype))
                boundaries.append(engine.backward_and_step(loss))
            assert boundaries == [False, True]
            out[stage, precision, clip] = engine.grad_norm()
    return out


def check(norms: dict, world: int) -> None:
    """Every case against the reference; all mismatches in one failure."""
    wrong = []
    for (stage, precision, clip), norm in norms.items():
        expected = reference_norm(precision, world)
        tolerance = dict(rel=3e-2) if precision == "bf16" else dict(rel=1e-5)  # bf16: 8-bit mantissa
        if norm is None or norm != pytest.approx(expected, **tolerance):
            wrong.append(f"ZeRO-{stage} {precision} clip_grad={clip}: {norm} against {expected}")
    assert not wrong, f"{world} worker(s):\n" + "\n".join(wrong)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    norms = engine_norms(rank, world)
    torch.save(norms, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


# Spawned processes, one worker included: a process group (and DeepSpeed's hold on it) left in
# the test process would change what later tests see.
@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_the_grad_norm_is_the_plain_models_and_every_worker_reads_it(tmp_path, world):
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "norms")
    mp.spawn(_worker, args=(world, port, out), nprocs=world)
    for rank in range(world):  # every worker reads the same global norm
        check(torch.load(f"{out}.{rank}"), world=world)
