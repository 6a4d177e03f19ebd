"""The whole downstream loop on CPU (slow: a few minutes): the zero-flag pretraining run (its
defaults, only the output locations moved) with the real stack, then an evaluation of it and of
its own random initialisation."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from service.config import EvaluateConfig, PretrainConfig, with_overrides
from service.evaluation.evaluate import run_evaluation
from service.training.pretrain import run_pretraining

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_the_zero_flag_run_lifts_knn_and_linear_probe_above_the_random_start(ray_cluster, digits_dir, tmp_path):
    tracking_uri = f"sqlite:///{tmp_path}/mlruns.db"
    cfg = with_overrides(PretrainConfig(), {
        "data.embedded_dir": str(digits_dir), "checkpoint.storage_path": str(tmp_path / "runs"),
        "mlflow.tracking_uri": tracking_uri, "mlflow.registered_model_name": "loop-tiny",
    }).validate()
    pretrained = run_pretraining(cfg)
    assert pretrained.registered_uri == "models:/loop-tiny/1"

    # The run shows it itself: k-NN at step 0 (the random start) and at the end.
    knn = MlflowClient(tracking_uri).get_metric_history(pretrained.mlflow_run_id, "val/knn_top1")
    by_step = {m.step: m.value for m in knn}
    assert min(by_step) == 0 and by_step[max(by_step)] > by_step[0] + 0.05

    def evaluate(model: str) -> dict[str, float]:
        eval_cfg = EvaluateConfig(model=model, tracking_uri=tracking_uri, data=cfg.data)
        return run_evaluation(eval_cfg, device="cpu").metrics

    trained = evaluate(pretrained.registered_uri)
    start = evaluate(f"random:convmae_tiny:{cfg.model.img_size}")  # seed 0: the run's own starting weights
    print(f"pretrained {trained}\nrandom init {start}")
    assert trained["eval/knn_top1"] > start["eval/knn_top1"] + 0.05
    assert trained["eval/linear_probe_top1"] > start["eval/linear_probe_top1"] + 0.05
    assert trained["eval/recon_loss"] < 0.7 * start["eval/recon_loss"]
