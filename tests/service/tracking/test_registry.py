"""Registering a checkpoint's model in a real MLflow server: once per checkpoint, never fatal."""

import uuid

import pytest
import torch

import convmae
from service.tracking.registry import CHECKPOINT_TAG, load_model, register_checkpoint_once


@pytest.fixture()
def run(mlflow_server):
    from mlflow import MlflowClient

    from service.tracking import ensure_experiment

    client = MlflowClient(mlflow_server)
    run_id = client.create_run(ensure_experiment(client, mlflow_server, "registry-tests")).info.run_id
    return client, run_id, f"reg-{uuid.uuid4().hex[:8]}"


def checkpoint_of(folder):
    from ray.train import Checkpoint

    folder.mkdir(parents=True)
    (folder / "marker.txt").write_text(folder.name)
    return Checkpoint.from_directory(str(folder))


def exporter(calls):
    def export(folder, tmp):
        calls.append((folder / "marker.txt").read_text())  # sees the checkpoint's own files
        torch.manual_seed(len(calls))
        return convmae.save_pretrained(convmae.build_model("convmae_tiny", img_size=32), tmp / "convmae")

    return export


def register(mlflow_server, run_id, name, checkpoint, export):
    return register_checkpoint_once(checkpoint, export, tracking_uri=mlflow_server, run_id=run_id,
                                    registered_name=name, tags={"data": "memory://x"}, metadata={})


def test_a_checkpoint_is_registered_once_and_a_new_one_gets_a_new_version(mlflow_server, run, tmp_path):
    client, run_id, name = run
    calls = []
    first = checkpoint_of(tmp_path / "ckpt_a")
    out = register(mlflow_server, run_id, name, first, exporter(calls))
    assert out["registered_uri"] == f"models:/{name}/1"
    version = client.get_model_version(name, "1")
    assert version.tags[CHECKPOINT_TAG] == first.path and version.tags["data"] == "memory://x"

    # Running a finished job again hands over the same checkpoint: same version, no export.
    again = register(mlflow_server, run_id, name, first, exporter(calls))
    assert again["registered_uri"] == f"models:/{name}/1" and again["version"] == "1"
    assert calls == ["ckpt_a"]
    assert len(client.search_model_versions(f"name = '{name}'")) == 1

    out = register(mlflow_server, run_id, name, checkpoint_of(tmp_path / "ckpt_b"), exporter(calls))
    assert out["registered_uri"] == f"models:/{name}/2" and calls == ["ckpt_a", "ckpt_b"]
    assert isinstance(load_model(out["registered_uri"], tracking_uri=mlflow_server), convmae.ConvMAE)


def test_a_failing_export_is_a_warning_not_an_error(mlflow_server, run, tmp_path, caplog):
    _, run_id, name = run

    def broken(folder, tmp):
        raise RuntimeError("shards missing")

    out = register(mlflow_server, run_id, name, checkpoint_of(tmp_path / "ckpt"), broken)
    assert out == {"registered_uri": None, "model_uri": None, "version": None}
    assert "shards missing" in caplog.text and str(tmp_path / "ckpt") in caplog.text
