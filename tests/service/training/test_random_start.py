"""The random start that ``train.eval_before_training`` scores at the first validation."""

from __future__ import annotations

import pytest
import torch

import service.training.pretrain_worker as pretrain_worker
from service.config import PretrainConfig, with_overrides
from service.runtime.worker import WorkerContext
from service.training.pretrain_worker import starting_model
from service.training.settings import WorkerSettings


class StartedTraining(Exception):
    """Stops the worker once it hands its model to the engine."""


def weights_the_worker_starts_from(cfg: PretrainConfig, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """Runs the worker's entry point in this process up to the engine build and returns the
    weights it hands to the engine (the rest of training is not needed to see them)."""
    handed: dict[str, torch.Tensor] = {}

    def start_session(model, *args, **kwargs):
        handed.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        raise StartedTraining

    monkeypatch.setattr(pretrain_worker, "start_session", start_session)
    monkeypatch.setattr(pretrain_worker, "configure_worker_logging", lambda: None)  # keeps pytest's log capture
    monkeypatch.setattr(pretrain_worker, "worker_context",
                        lambda: WorkerContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    with pytest.raises(StartedTraining):
        pretrain_worker.train_worker(WorkerSettings(
            config=cfg, use_gpu=False, precision="fp32", compile_model=False, lr=1e-3, train_url="unused",
            val_url="unused", tracking_uri="unused", mlflow_run_id=None, credentials=None, job_started_at=None))
    return handed


def test_the_starting_model_is_the_one_training_started_from_and_leaves_the_random_state_alone(monkeypatch):
    cfg = with_overrides(PretrainConfig(), {"model.name": "convmae_tiny", "model.img_size": 32, "train.seed": 7})
    torch.manual_seed(99)  # whatever state the worker process starts in
    trained = weights_the_worker_starts_from(cfg, monkeypatch)

    torch.manual_seed(123)  # training has moved the random state on since
    state = torch.random.get_rng_state()
    rebuilt = starting_model(cfg, torch.device("cpu"), torch.bfloat16)

    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(p.dtype == torch.bfloat16 for p in rebuilt.parameters())
    weights = rebuilt.state_dict()
    assert weights.keys() == trained.keys()
    assert all(torch.equal(weights[k], trained[k].to(weights[k].dtype)) for k in trained)
    # Another seed starts elsewhere: the comparison above can tell starts apart.
    other = starting_model(with_overrides(cfg, {"train.seed": 8}), torch.device("cpu"), torch.float32).state_dict()
    assert not all(torch.equal(other[k], trained[k]) for k in trained)
