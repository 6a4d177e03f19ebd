"""A real Ray Tune sweep of the tiny preset on the local Ray cluster, its experiment directory on
a loopback S3 server, tracked in a real MLflow server: ASHA stops the bad trial, the sweep is
interrupted (the signal Ctrl+C sends Tune), resumed from S3 without redoing the finished trial,
and the best model is registered under an alias."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from service.config import TuneJobConfig, with_overrides
from service.tracking import ERROR_TAG
from service.tracking.provenance import provenance
from service.tracking.registry import load_model
from service.tune.sweep import STOPPED_BY_TAG, SWEEP_TAG, run_sweep

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    from service.config import DataConfig
    from service.data import resolve_data_urls

    root = tmp_path_factory.mktemp("embedded-tune")
    resolve_data_urls(DataConfig(embedded_dir=str(root)))
    return root


def sweep_config(storage: str, digits_dir: Path, tracking_uri: str) -> TuneJobConfig:
    return with_overrides(TuneJobConfig(), {
        "model.name": "convmae_tiny",
        "model.img_size": 32,
        "data.embedded_dir": str(digits_dir),
        "data.loader_workers": 0,
        "train.epochs": 2,
        "train.batch_size_per_worker": 16,
        "train.warmup_epochs": 0.1,
        "train.log_every_steps": 50,
        "train.knn_train_samples": 256,
        "dist.num_workers": 1,
        "dist.use_gpu": False,
        "checkpoint.every_steps": 1000,
        "mlflow.tracking_uri": tracking_uri,
        "mlflow.experiment": "sweep-e2e",
        "mlflow.registered_model_name": "sweep-tiny",
        "mlflow.system_metrics": False,
        "sweep.name": "lr",
        # A learning rate that learns and one that cannot: ASHA must stop the second at its
        # first rung. One trial at a time keeps the order (and so ASHA's decision) fixed.
        "sweep.space": {"train.blr": "grid [2.0e-3, 1.0e-8]"},
        "sweep.max_concurrent_trials": 1,
        "sweep.objective": "val/recon_loss",
        "sweep.storage_path": storage,
    }).validate()


def interrupt_when_second_trial_starts(tracking_uri: str) -> threading.Thread:
    """Sends this process SIGUSR1 (Tune's stop signal, like Ctrl+C) as soon as trial 1 opens its
    MLflow run, i.e. after trial 0 finished and before trial 1 trains."""

    def watch() -> None:
        client = MlflowClient(tracking_uri)
        deadline = time.time() + 600
        while time.time() < deadline:
            experiment = client.get_experiment_by_name("sweep-e2e")
            if experiment is not None:
                runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = 'lr'")
                if any(r.data.tags.get("convmae.trial_id", "").endswith("_00001") for r in runs):
                    os.kill(os.getpid(), signal.SIGUSR1)
                    return
            time.sleep(0.5)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def checkpoints(experiment: str, run_name: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return sorted(p for p in fs.ls(f"{experiment}/train_runs/{run_name}") if "/checkpoint_" in p)


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str):
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def test_sweep_stops_bad_trials_resumes_after_interruption_and_registers_the_best(
    ray_cluster, mlflow_server, s3_bucket, digits_dir
):
    cfg = sweep_config(f"{s3_bucket}/sweeps", digits_dir, mlflow_server)
    experiment = f"{s3_bucket.removeprefix('s3://')}/sweeps/lr"
    watcher = interrupt_when_second_trial_starts(mlflow_server)

    first = run_sweep(cfg)
    watcher.join(timeout=5)
    assert first.interrupted
    assert [t.status for t in first.trials] == ["completed", "unfinished"]
    assert first.registered_uri is None  # nothing is registered from a partial sweep
    client = MlflowClient(mlflow_server)
    assert client.get_run(first.parent_run_id).info.status == "KILLED"
    finished = first.trials[0]
    finished_run = next(r for r in child_runs(client, client.get_run(first.parent_run_id).info.experiment_id,
                                              first.parent_run_id)
                        if r.data.tags["convmae.trial_id"] == finished.trial_id)
    assert finished_run.info.status == "FINISHED"
    # Tune tore the cut-short trial down without telling its driver: the sweep ended its run.
    [cut_short] = [r for r in child_runs(client, finished_run.info.experiment_id, first.parent_run_id)
                   if r.info.run_id != finished_run.info.run_id]
    assert cut_short.info.status == "KILLED"
    finished_history = client.get_metric_history(finished_run.info.run_id, "train/loss")
    finished_checkpoints = checkpoints(experiment, f"lr-{finished.trial_id}")
    assert finished_checkpoints

    second = run_sweep(cfg)  # the same command again resumes the sweep

    assert not second.interrupted
    assert second.parent_run_id == first.parent_run_id
    by_id = {t.trial_id: t for t in second.trials}
    assert set(by_id) == {t.trial_id for t in first.trials}
    # the finished trial was not redone: same result, no new steps, no new checkpoints
    assert by_id[finished.trial_id].objective == pytest.approx(finished.objective)
    assert len(client.get_metric_history(finished_run.info.run_id, "train/loss")) == len(finished_history)
    assert checkpoints(experiment, f"lr-{finished.trial_id}") == finished_checkpoints
    # ASHA stopped the learning rate that cannot learn after its first epoch
    bad = next(t for t in second.trials if t.params["train.blr"] < 1e-6)
    assert (bad.status, bad.epochs) == ("stopped early", 1)
    assert second.best.trial_id == finished.trial_id and second.best.status == "completed"

    parent = client.get_run(second.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["space.train.blr"] == "grid [2.0e-3, 1.0e-8]"
    assert parent.data.tags["best_trial"] == finished.trial_id
    assert {"trials.json", "trials.txt"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = child_runs(client, parent.info.experiment_id, parent.info.run_id)
    assert sorted(r.data.tags["convmae.trial_id"] for r in children) == sorted(by_id)  # one per trial
    assert all(r.data.tags[SWEEP_TAG] == "lr" for r in children)
    assert all(r.data.params["train.blr"] in ("0.002", "1e-08") for r in children)
    assert all(client.get_metric_history(r.info.run_id, "val/recon_loss") for r in children)
    # Every run ended with the status it deserves: the stopped trial's is not RUNNING forever.
    status = {r.data.tags["convmae.trial_id"]: r.info.status for r in children}
    assert status == {finished.trial_id: "FINISHED", bad.trial_id: "KILLED"}
    # ... and says why: ASHA stopped it. Tune tears a trial's Train run down when it stops the
    # trial (at ASHA's verdict, and at its last epoch too): that is no error of the run's.
    tags = {r.data.tags["convmae.trial_id"]: r.data.tags for r in children}
    assert {t: v[ERROR_TAG] for t, v in tags.items() if ERROR_TAG in v} == {}
    assert tags[bad.trial_id].get(STOPPED_BY_TAG) == "asha"
    assert STOPPED_BY_TAG not in tags[finished.trial_id]
    assert parent.data.tags["git_commit"] == provenance()["git_commit"]

    assert second.registered_uri == "models:/sweep-tiny@best-sweep-lr"
    version = client.get_model_version_by_alias("sweep-tiny", "best-sweep-lr")
    best_run = next(r for r in children if r.data.tags["convmae.trial_id"] == finished.trial_id)
    assert version.run_id == best_run.info.run_id
    model = load_model(second.registered_uri, tracking_uri=mlflow_server)
    assert model.config.img_size == 32


@pytest.mark.slow  # the searcher's own choices are unit-tested (test_tune.py); the default run stays < 15 min
def test_tpe_sweep_samples_the_space_and_registers_its_best(ray_cluster, digits_dir, tmp_path):
    cfg = with_overrides(sweep_config(str(tmp_path / "sweeps"), digits_dir, f"sqlite:///{tmp_path}/mlruns.db"), {
        "train.epochs": 1,
        "sweep.name": "tpe",
        "sweep.searcher": "tpe",
        "sweep.num_samples": 2,
        "sweep.scheduler": "fifo",
        "sweep.objective": "auto",  # labeled digits: k-NN top-1
        "sweep.space": {"model.mask_ratio": "choice [0.5, 0.75]", "train.blr": "loguniform [1e-4, 1e-3]"},
    }).validate()
    result = run_sweep(cfg)
    assert (result.metric, result.mode) == ("val/knn_top1", "max")
    assert [t.status for t in result.trials] == ["completed", "completed"]
    for trial in result.trials:
        assert trial.params["model.mask_ratio"] in (0.5, 0.75)
        assert 1e-4 <= trial.params["train.blr"] <= 1e-3
        assert 0.0 <= trial.objective <= 1.0
    assert result.best.objective == max(t.objective for t in result.trials)
    assert result.registered_uri == "models:/sweep-tiny@best-sweep-tpe"
