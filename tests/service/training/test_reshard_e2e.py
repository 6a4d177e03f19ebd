"""Resuming a run on another number of workers, on the real stack (local Ray cluster, DeepSpeed
over gloo, MLflow): 2 workers lose one, the run goes on with 1, then with 3, its loss curve
continuing and the interrupted epoch read on from where it stopped; a config that cannot
resume the checkpoint stops before any worker starts, its MLflow run FAILED with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from service.config import ConfigError
from service.tracking.mlflow_run import ERROR_TAG
from service.training.pretrain import run_pretraining
from tests.service.training.test_pretrain_e2e import loss_by_step, tiny_config

pytestmark = pytest.mark.e2e


def newest_train_state(run_dir: Path) -> dict:
    states = [json.loads((f / "train_state.json").read_text()) for f in run_dir.glob("checkpoint_*") if f.is_dir()]
    return max(states, key=lambda s: s["optimizer_step"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_run_goes_on_with_1_then_3_workers_after_2(ray_cluster, digits_dir, tmp_path, monkeypatch, stage):
    def config(workers: int, max_steps: int, **more):
        return tiny_config(tmp_path, digits_dir, **{"run_name": "elastic", "dist.num_workers": workers,
                                                    "dist.zero_stage": stage, "train.max_steps": max_steps,
                                                    "train.knn_k": 0, "mlflow.register": False, **more})

    # 2 workers; one is lost after step 5 (the last checkpoint is step 4).
    monkeypatch.setenv("CONVMAE_FAULT_INJECT_STEP", "5")
    monkeypatch.setenv("CONVMAE_FAULT_INJECT_MARKER", str(tmp_path / "lost"))
    with pytest.raises(Exception):  # noqa: B017 - Ray's TrainingFailedError, whatever its module
        run_pretraining(config(2, 8))
    assert (tmp_path / "lost").exists()
    run_dir = tmp_path / "runs" / "elastic"
    assert newest_train_state(run_dir)["world_size"] == 2

    by_one = run_pretraining(config(1, 8))  # steps 5-8 on 1 worker
    state = newest_train_state(run_dir)
    assert (state["optimizer_step"], state["world_size"], state["epoch"]) == (8, 1, 0)
    # The rest of epoch 1 after 2 workers read 4 batches each: 1 worker reads on from there.
    assert state["loader_state"]["reshards"] == [[2, 4]]
    assert state["loader_state"]["batches_consumed"] == 4
    by_three = run_pretraining(config(3, 12))  # steps 9-12 on 3 workers
    state = newest_train_state(run_dir)
    assert (state["optimizer_step"], state["world_size"]) == (12, 3)
    assert state["loader_state"]["reshards"] == [[2, 4], [1, 4]]

    client = MlflowClient(by_three.tracking_uri)
    assert by_one.mlflow_run_id == by_three.mlflow_run_id  # one run throughout
    assert client.get_run(by_three.mlflow_run_id).info.status == "FINISHED"
    losses = loss_by_step(by_three.tracking_uri, by_three.mlflow_run_id)
    assert sorted(losses) == list(range(1, 13))  # every step once
    # The curve goes on from where it was: no resumed step is back at the untrained loss.
    untrained, trained = losses[1], min(losses[s] for s in range(2, 5))
    assert trained < untrained
    for step in range(5, 13):
        assert losses[step] < untrained - 0.5 * (untrained - trained), (step, losses)

    # A ZeRO stage other than the checkpoint's cannot resume it: refused before any worker runs.
    other = 1 if stage != 1 else 2
    with pytest.raises(ConfigError, match=rf"--dist.zero_stage {stage}"):
        run_pretraining(config(3, 16, **{"dist.zero_stage": other}))
    run = client.get_run(by_three.mlflow_run_id)
    assert run.info.status == "FAILED"
    assert f"--dist.zero_stage {stage}" in run.data.tags[ERROR_TAG]
    assert newest_train_state(run_dir)["optimizer_step"] == 12  # nothing trained
