"""The worker loop every training job shares (``service.training.loop``), driven in this process.

A real DeepSpeed engine over a tiny model on one gloo rank takes the steps; the job's step
function, loaders and validation are small stand-ins, and Ray Train's ``report`` (which needs a
Ray Train worker) is replaced by a recorder of the checkpoints the loop saves. Two-rank
behaviour (the loss averaged over workers) runs in two spawned gloo processes.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from typing import Any

import pytest
import torch

import service.training.loop as loop
from service.config import PretrainConfig, with_overrides
from service.runtime.engine import Engine
from service.runtime.worker import WorkerContext
from service.tracking import NullTracker
from service.training.checkpoints import TrainState
from service.training.settings import WorkerSettings
from tests.fixtures.mlflow_server import free_port

BASE_LR = 0.1
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def one_gloo_rank():
    """A single-rank gloo process group, as a one-worker run has; torn down afterwards."""
    if torch.distributed.is_initialized():  # another test module's: use it, leave it
        yield
        return
    with pytest.MonkeyPatch.context() as env:
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
            env.setenv(key, value)
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
        try:
            yield
        finally:
            torch.distributed.destroy_process_group()


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.eye(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.weight).square().mean()


class ListLoader:
    """An epoch of ``batches`` micro-batches; iterates from ``batches_consumed`` on (a resumed
    loader's position), like the real loader its length is the whole epoch's."""

    def __init__(self, epoch: int, batches: int, resume_state: dict | None = None) -> None:
        self.epoch, self.batches = epoch, batches
        self.batches_consumed = (resume_state or {}).get("batches_consumed", 0)
        self.corrupt_samples = 0

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        while self.batches_consumed < self.batches:
            k = self.batches_consumed
            self.batches_consumed += 1
            yield {"x": torch.full((2, 4), 1.0 + 0.1 * k), "id": (self.epoch, k)}

    def state_dict(self) -> dict[str, Any]:
        return {"batches_consumed": self.batches_consumed, "world_size": 1}


class RecordingTracker(NullTracker):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step: int) -> None:
        self.metrics.append((step, dict(metrics)))


class Saved(list):
    """The checkpoints the loop saved: (train state, reported metrics)."""


@pytest.fixture()
def saved(monkeypatch) -> Saved:
    """Records each checkpoint save instead of reporting it to Ray Train."""
    record = Saved()

    class RecordingWriter:
        waited_s = 0.0

        def __init__(self, rank: int, **kwargs: Any) -> None:
            pass

        def save(self, engine, state: TrainState, metrics: dict[str, Any]) -> None:
            record.append((asdict(state), dict(metrics)))

        def wait(self) -> None:
            pass

    monkeypatch.setattr(loop.checkpoints, "CheckpointWriter", RecordingWriter)
    return record


def config(**overrides: Any) -> PretrainConfig:
    base = {"train.epochs": 2, "train.batch_size_per_worker": 2, "train.grad_accum_steps": 2,
            "train.warmup_epochs": 0, "train.min_lr": 0.0, "train.log_every_steps": 3, "train.val_every_epochs": 2,
            "train.clip_grad": 1.0, "checkpoint.every_steps": 2, "dist.num_workers": 1, "dist.use_gpu": False,
            "dist.zero_stage": 1}
    return with_overrides(PretrainConfig(), {**base, **overrides})


class Run:
    """One ``run_epochs`` call over ``batches`` micro-batches per epoch; records what the job's
    callbacks saw."""

    def __init__(self, cfg: PretrainConfig, batches: int, state: TrainState | None = None,
                 loss_of=lambda loss: loss) -> None:
        torch.manual_seed(0)
        engine = Engine.build(Tiny(), cfg, use_gpu=False, precision="fp32", lr=BASE_LR)
        self.tracker = RecordingTracker()
        self.session = loop.WorkerSession(WorkerContext(0, 1, 0, CPU), engine, state or TrainState(), self.tracker,
                                          lr=BASE_LR)
        self.cfg, self.batches = cfg, batches
        self.loaders: list[tuple[int, dict | None]] = []
        self.steps: list[tuple[tuple[int, int], float, float]] = []  # (batch id, lr, loss)
        self.ends: list[loop.EpochEnd] = []
        self.loss_of = loss_of

    def __call__(self) -> Run:
        engine = self.session.engine

        def loader_for(epoch: int, resume_state: dict | None) -> ListLoader:
            self.loaders.append((epoch, resume_state))
            return ListLoader(epoch, self.batches, resume_state)

        def step(batch: dict[str, Any]) -> torch.Tensor:
            loss = self.loss_of(engine(batch["x"]))
            self.steps.append((batch["id"], engine.ds_engine.optimizer.param_groups[0]["lr"], float(loss)))
            return loss

        def epoch_end(end: loop.EpochEnd) -> dict[str, float]:
            self.ends.append(end)
            return {"val/score": float(end.epoch)} if end.validation_due else {}

        schedule = loop.plan_schedule(self.cfg, self.batches)
        loop.run_epochs(self.session, self.cfg, loader_for=loader_for, step=step, epoch_end=epoch_end,
                        schedule=schedule)
        return self


def cosine(step: int, total: int) -> float:
    """The lr of optimizer step ``step`` (0-based) without warm-up, down to 0 at ``total``."""
    return BASE_LR * 0.5 * (1 + math.cos(math.pi * step / total))


def test_epochs_step_checkpoint_log_and_validate_on_their_schedules(one_gloo_rank, saved):
    # 6 micro-batches of 2 per epoch, 2 per step: 3 steps per epoch, 9 in all.
    # No clipping (the default): the gradient norm is logged all the same.
    run = Run(config(**{"train.epochs": 3, "train.clip_grad": None}), batches=6)()

    # Every micro-batch once, epoch by epoch; a step's two micro-batches share its lr.
    assert [batch for batch, _, _ in run.steps] == [(e, k) for e in range(3) for k in range(6)]
    assert [lr for _, lr, _ in run.steps] == pytest.approx([cosine(s, 9) for s in range(9) for _ in range(2)])
    assert run.loaders == [(0, None), (1, None), (2, None)]
    state = run.session.state
    assert (state.epoch, state.optimizer_step, state.micro_step, state.micro_in_epoch) == (3, 9, 18, 0)
    assert state.samples_seen == 18 * 2

    # Step checkpoints every 2 steps, but not on an epoch's last step (6), which the epoch end saves.
    assert [(s["optimizer_step"], m.get("epochs_completed")) for s, m in saved] == [
        (2, None), (3, 1), (4, None), (6, 2), (8, None), (9, 3)]
    assert [m["step"] for _, m in saved] == [2, 3, 4, 6, 8, 9]
    # Validation every second epoch, and at the end.
    assert run.ends == [loop.EpochEnd(0, True, False, False), loop.EpochEnd(1, True, False, True),
                        loop.EpochEnd(2, True, True, True)]
    assert [m.get("val/score") for _, m in saved] == [None, None, None, 1.0, None, 2.0]

    # Progress every 3 steps: the mean loss of the window's 6 micro-batches.
    logged = {step: m for step, m in run.tracker.metrics if "train/loss" in m}
    assert sorted(logged) == [3, 6, 9]
    losses = [loss for _, _, loss in run.steps]
    for end in (3, 6, 9):
        window = losses[2 * end - 6: 2 * end]
        assert logged[end]["train/loss"] == pytest.approx(sum(window) / 6)
    assert logged[9]["train/lr"] == pytest.approx(cosine(8, 9))
    assert [logged[s]["train/epoch"] for s in (3, 6, 9)] == [0, 1, 2]  # the 0-based epoch the step was in
    assert all(logged[s]["train/grad_norm"] > 0 for s in (3, 6, 9))
    assert [(step, m) for step, m in run.tracker.metrics if "val/score" in m] == [(6, {"val/score": 1.0}),
                                                                                 (9, {"val/score": 2.0})]


def test_leftover_micro_batches_never_straddle_epochs(one_gloo_rank, saved):
    run = Run(config(), batches=7)()  # 7 micro-batches, 2 per step: the 7th of each epoch is left
    assert [batch for batch, _, _ in run.steps] == [(e, k) for e in range(2) for k in range(6)]
    assert run.session.state.optimizer_step == 6 and run.session.state.epoch == 2


def test_max_steps_ends_the_run_mid_epoch_with_a_validated_final_checkpoint(one_gloo_rank, saved):
    run = Run(config(**{"train.max_steps": 4}), batches=6)()
    assert len(run.steps) == 8
    assert run.ends == [loop.EpochEnd(0, True, False, False), loop.EpochEnd(1, False, True, True)]
    state = run.session.state
    assert (state.epoch, state.optimizer_step, state.micro_in_epoch) == (1, 4, 2)  # epoch 2 not finished
    assert [(s["optimizer_step"], m.get("epochs_completed")) for s, m in saved] == [(2, None), (3, 1), (4, 1)]
    assert saved[-1][0]["loader_state"] == {"batches_consumed": 2, "world_size": 1}  # resumes mid-epoch
    assert run.tracker.metrics[-1][0] == 4  # the last step is logged whatever log_every_steps says


def test_a_resumed_run_goes_on_at_its_position_and_schedule(one_gloo_rank, saved):
    resumed = TrainState(epoch=0, optimizer_step=2, micro_step=4, micro_in_epoch=4, samples_seen=8,
                         loader_state={"batches_consumed": 4, "world_size": 1}, world_size=1, zero_stage=1)
    run = Run(config(), batches=6, state=resumed)()
    assert run.loaders == [(0, {"batches_consumed": 4, "world_size": 1}), (1, None)]
    assert [batch for batch, _, _ in run.steps] == [(0, 4), (0, 5)] + [(1, k) for k in range(6)]
    assert [lr for _, lr, _ in run.steps] == pytest.approx([cosine(s, 6) for s in range(2, 6) for _ in range(2)])
    assert [s["optimizer_step"] for s, _ in saved] == [3, 4, 6]
    assert run.session.state.micro_step == 12


def test_a_non_finite_loss_stops_the_run_naming_the_step(one_gloo_rank, saved):
    run = Run(config(**{"train.log_every_steps": 1}), batches=6, loss_of=lambda loss: loss * float("nan"))
    with pytest.raises(FloatingPointError, match=r"^loss is nan at step 1; lower train.blr$"):
        run()
    assert saved == []


def test_a_finished_run_takes_no_step_and_saves_nothing_new(one_gloo_rank, saved):
    done = TrainState(epoch=2, optimizer_step=6, micro_step=12, world_size=1, zero_stage=1)
    run = Run(config(), batches=6, state=done)()
    assert run.steps == [] and run.loaders == [] and saved == []


# ---------------------------------------------------------------- the loss window


def test_the_loss_window_means_the_losses_since_the_last_log_and_starts_again():
    window = loop.LossWindow(CPU)
    assert math.isnan(window.last_loss())
    for loss in (1.0, 2.0, 6.0):
        window.add(torch.tensor(loss, requires_grad=True))
    assert window.last_loss() == 6.0
    assert window.mean_over_workers() == 3.0
    window.add(torch.tensor(5.0))
    assert window.mean_over_workers() == 5.0  # only what came after the last log
    assert window.mean_over_workers() == 0.0  # an empty window divides by one, not zero


def _two_rank_window(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    window = loop.LossWindow(CPU)
    for loss in ([1.0, 2.0, 3.0] if rank == 0 else [10.0]):  # uneven: a mean of all four, not of the means
        window.add(torch.tensor(loss))
    mean = window.mean_over_workers()
    torch.save(mean, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_the_loss_window_means_over_all_workers_micro_batches(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_window, args=(free_port(), str(tmp_path)), nprocs=2)
    assert [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)] == [4.0, 4.0]  # (1+2+3+10)/4


# ---------------------------------------------------------------- start_session


def test_start_session_builds_the_engine_restores_the_state_and_gives_only_rank_0_a_tracker(one_gloo_rank,
                                                                                             mlflow_server, monkeypatch):
    from mlflow import MlflowClient

    from service.tracking import NullTracker as Null
    from service.tracking import ensure_experiment

    tracking_uri = mlflow_server
    client = MlflowClient(tracking_uri)
    run_id = client.create_run(ensure_experiment(client, tracking_uri, "loop-tests")).info.run_id
    restored: list[TrainState | None] = [None]
    monkeypatch.setattr(loop.checkpoints, "restore", lambda engine, rank: restored[0])
    cfg = config()
    settings = WorkerSettings(config=cfg, use_gpu=False, precision="fp32", compile_model=False, lr=0.25,
                                 train_url="unused", val_url=None, tracking_uri=tracking_uri, mlflow_run_id=run_id,
                                 credentials=None, job_started_at=123.0)

    chief = loop.start_session(Tiny(), cfg, settings, WorkerContext(0, 1, 0, CPU))
    assert chief.is_chief and chief.lr == 0.25 and chief.job_started_at == 123.0
    assert chief.state == TrainState() and chief.dtype == torch.float32
    assert chief.engine.ds_engine.optimizer.param_groups[0]["lr"] == 0.25
    assert not isinstance(chief.tracker, Null) and chief.tracker.run_id == run_id
    chief.tracker.close()
    # A fresh run records the DeepSpeed config it trains with.
    assert [a.path for a in client.list_artifacts(run_id)] == ["deepspeed_config.json"]

    restored[0] = TrainState(epoch=1, optimizer_step=3)
    other = loop.start_session(Tiny(), cfg, settings, WorkerContext(1, 1, 0, CPU))
    assert not other.is_chief and isinstance(other.tracker, Null)
    assert other.state == TrainState(epoch=1, optimizer_step=3)
