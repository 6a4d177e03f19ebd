"""The evaluation driver on the embedded digits: metrics, table, JSON, logging onto the
model's MLflow run (real server), and a dead server that only warns."""

from __future__ import annotations

import json
import socket
import uuid

import pytest
import torch
from mlflow import MlflowClient

import convmae
from service.config import DataConfig, EvaluateConfig
from service.evaluation.evaluate import EvaluationResult, log_to_run_metrics, run_evaluation


def digits(digits_dir) -> DataConfig:
    return DataConfig(embedded_dir=str(digits_dir), loader_workers=0)


def test_random_baseline_on_digits_gives_all_three_metrics(digits_dir, tmp_path):
    cfg = EvaluateConfig(model="random:convmae_tiny:32", data=digits(digits_dir), output=str(tmp_path / "r.json"))
    result = run_evaluation(cfg, device="cpu")
    assert set(result.metrics) == {"eval/knn_top1", "eval/linear_probe_top1", "eval/recon_loss"}
    # Even random conv features separate digits far above chance (10%).
    assert 0.3 < result.metrics["eval/knn_top1"] <= 1.0
    assert 0.3 < result.metrics["eval/linear_probe_top1"] <= 1.0
    assert result.metrics["eval/recon_loss"] > 0
    assert result.details["train_samples"] == 1617 and result.details["val_samples"] == 180
    assert result.details["num_classes"] == 10 and result.run_id is None and not result.logged
    table = result.table()
    assert "k-NN top-1" in table and f"{result.metrics['eval/knn_top1']:.2%}" in table
    assert json.loads((tmp_path / "r.json").read_text())["metrics"] == result.metrics
    # Deterministic: the same model and data give the same numbers.
    assert run_evaluation(cfg, device="cpu").metrics == result.metrics



@pytest.mark.slow  # a full evaluation pass over the digits: minutes on a busy 2-core machine
def test_the_plain_vit_mae_baseline_is_scored_the_same_way(digits_dir):
    # jobs/evaluate.py --model random:mae_tiny (or a registered baseline): k-NN, probe and loss.
    cfg = EvaluateConfig(model="random:mae_tiny:32", data=digits(digits_dir))
    result = run_evaluation(cfg, device="cpu")
    assert set(result.metrics) == {"eval/knn_top1", "eval/linear_probe_top1", "eval/recon_loss"}
    assert 0.1 < result.metrics["eval/knn_top1"] <= 1.0 and result.metrics["eval/recon_loss"] > 0
    assert result.details["train_samples"] == 1617 and result.details["val_samples"] == 180

def test_metrics_are_logged_on_the_run_of_a_registered_model(mlflow_server, digits_dir, tmp_path):
    from service.tracking import ensure_experiment
    from service.tracking.registry import log_and_register

    torch.manual_seed(0)
    folder = convmae.save_pretrained(convmae.build_model("convmae_tiny", img_size=32), tmp_path / "convmae")
    client = MlflowClient(mlflow_server)
    run_id = client.create_run(ensure_experiment(client, mlflow_server, "evaluate-tests")).info.run_id
    name = f"eval-{uuid.uuid4().hex[:8]}"
    log_and_register(folder, tracking_uri=mlflow_server, run_id=run_id, registered_name=name)
    client.set_registered_model_alias(name, "candidate", "1")

    cfg = EvaluateConfig(model=f"models:/{name}@candidate", tracking_uri=mlflow_server, data=digits(digits_dir),
                         knn_k=10, linear_probe=False)
    result = run_evaluation(cfg, device="cpu")
    assert result.run_id == run_id and result.logged
    assert "eval/linear_probe_top1" not in result.metrics and "off" in result.table()
    run = client.get_run(run_id)
    assert run.data.metrics["eval/knn_top1"] == pytest.approx(result.metrics["eval/knn_top1"])
    assert run.data.metrics["eval/recon_loss"] == pytest.approx(result.metrics["eval/recon_loss"])
    assert run.data.tags["eval.model_uri"] == cfg.model and run.data.tags["eval.knn_k"] == "10"
    assert [a.path for a in client.list_artifacts(run_id, "evaluation")][0].startswith("evaluation/eval-")


def test_a_dead_tracking_server_is_a_warning(caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = EvaluationResult(model="m", metrics={"eval/knn_top1": 0.5}, details={"val_url": "v"})
    assert log_to_run_metrics(f"http://127.0.0.1:{port}", "abc", EvaluateConfig(), result) is False
    assert "MLflow read run failed" in caplog.text


def test_unlabeled_data_and_missing_splits_are_config_errors(tmp_path, digits_dir):
    from service.config import ConfigError

    with pytest.raises(ConfigError, match="data.val_url"):
        run_evaluation(EvaluateConfig(model="random:convmae_tiny:32",
                                      data=DataConfig(url=str(digits_dir / "digits" / "train"))))
    with pytest.raises(ConfigError, match="mask_ratio=1.5 is not allowed"):
        EvaluateConfig(mask_ratio=1.5).validate()
