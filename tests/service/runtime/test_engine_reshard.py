"""Resharding at the engine: a checkpoint written by 2 workers resumes on 1, whose checkpoint
resumes on 3, at ZeRO 0-3, with the fp32 weights carried over exactly and the next optimizer
step the one the writing workers would have taken (so Adam's moments and step count came too).

Real DeepSpeed over gloo in ``torch.multiprocessing`` worker processes, no Ray: one spawn per
world size, every stage in each. A toy model whose shapes do not divide by 2 or 3 (uneven
partitions) with a frozen parameter (ZeRO leaves it out of its optimizer shards).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch

from tests.service.runtime.engines import Toy

STAGES = (0, 1, 2, 3)
GLOBAL_BATCH = 6  # split evenly over 1, 2 and 3 workers: the same global step at every size


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of global batch ``step`` (different data every step, so Adam's
    moments matter)."""
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(GLOBAL_BATCH, 7, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g) * step
    return x.chunk(world)[rank], y.chunk(world)[rank]


def full_state(engine) -> dict[str, torch.Tensor]:
    """fp32 weights of every trainable parameter, gathered (a collective); at ZeRO-0 Adam's
    moments too. (DeepSpeed's safe_get_full_optimizer_state fails on a rank whose partition of
    a parameter group is empty here; at ZeRO-1-3 the moments are checked through the step that
    follows the load: Adam's update depends on them and on its step count.)"""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.ds_engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if engine.config["zero_optimization"]["stage"] == 0:
            state = engine.ds_engine.optimizer.state[p]
            out[f"{name}.fp32"] = p.detach().clone()
            out[f"{name}.exp_avg"], out[f"{name}.exp_avg_sq"] = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
            continue
        out[f"{name}.fp32"] = safe_get_full_fp32_param(p).clone()
    # Frozen parameters: universal loading leaves them to us (Engine.load restores them).
    frozen = {name: p for name, p in engine.ds_engine.module.named_parameters() if not p.requires_grad}
    gathered = contextlib.nullcontext()
    if engine.config["zero_optimization"]["stage"] == 3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(frozen.values()))
    with gathered:
        out.update({f"{name}.frozen": p.detach().clone() for name, p in frozen.items()})
    return out


def train_step(engine, step: int, rank: int, world: int) -> float:
    x, y = batch(step, rank, world)
    loss = engine(x, y)
    engine.backward_and_step(loss)
    summed = loss.detach().clone()
    torch.distributed.all_reduce(summed)
    return float(summed) / world


def build(stage: int, world: int, seed: int):
    from service.config import PretrainConfig, with_overrides
    from service.runtime.engine import Engine

    cfg = with_overrides(PretrainConfig(), {"dist.zero_stage": stage, "dist.num_workers": world,
                                            "train.batch_size_per_worker": GLOBAL_BATCH // world})
    torch.manual_seed(seed)  # a different start at every size: only the checkpoint can make them agree
    return Engine.build(Toy(), cfg, use_gpu=False, precision="fp32", lr=1e-2)


def phase(rank: int, world: int, port: int, root: str, load_from: str | None, save_to: str | None,
          first_step: int) -> None:
    """In each worker: per stage, load ``load_from`` (checking it against what its writers
    recorded), take the next step (checking it likewise), take one more and save to ``save_to``
    with what the next resumer must find."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from service.runtime.engine import saved_world_size
    from service.runtime.safe_checkpoint import safe_load

    for stage in STAGES:
        folder = Path(root) / f"zero{stage}"
        engine = build(stage, world, seed=world)
        step = first_step
        if load_from is not None:
            expected = safe_load(folder / f"{load_from}.expected.pt")
            writers = saved_world_size(folder / load_from)
            assert writers == (None if stage == 0 else expected["world"]), (stage, writers)
            client_state = engine.load(folder / load_from)
            assert client_state["train_state"] == {"optimizer_step": step - 1}
            got = full_state(engine)
            for key, value in expected["before"].items():  # copied exactly, whatever the partitioning
                assert torch.equal(got[key], value), f"ZeRO-{stage} {load_from} -> {world} workers: {key} differs"
            loss = train_step(engine, step, rank, world)
            assert abs(loss - expected["loss"]) < 1e-6, (stage, loss, expected["loss"])
            after = full_state(engine)
            for key, value in expected["after"].items():  # the step the writers would have taken
                assert torch.allclose(after[key], value, rtol=1e-4, atol=1e-6), \
                    f"ZeRO-{stage} {load_from} -> {world} workers: {key} after the step differs by {(after[key] - value).abs().max()}"
            step += 1
        else:
            for _ in range(2):
                train_step(engine, step, rank, world)
                step += 1
        if save_to is None:
            continue
        engine.save(folder / save_to, {"train_state": {"optimizer_step": step - 1}})
        before = full_state(engine)
        loss = train_step(engine, step, rank, world)  # what a resumer must reproduce
        after = full_state(engine)
        if rank == 0:
            torch.save({"world": world, "before": before, "loss": loss, "after": after},
                       folder / f"{save_to}.expected.pt")
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_engine_state_reshards_2_to_1_to_3_workers_at_every_zero_stage(tmp_path):
    import torch.multiprocessing as mp

    for stage in STAGES:
        (tmp_path / f"zero{stage}").mkdir()
    # 2 workers train 2 steps and save; 1 worker resumes, checks, trains, saves; 3 resume that.
    mp.spawn(phase, args=(2, free_port(), str(tmp_path), None, "by2", 1), nprocs=2)
    mp.spawn(phase, args=(1, free_port(), str(tmp_path), "by2", "by1", 3), nprocs=1)
    mp.spawn(phase, args=(3, free_port(), str(tmp_path), "by1", None, 4), nprocs=3)
    # Nothing of the conversions is left behind.
    assert not list(Path(tempfile.gettempdir()).glob("convmae-universal-*"))
