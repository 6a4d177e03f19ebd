"""The whole downstream loop on CPU (slow: a few minutes): pretrain a tiny model on the
embedded digits with the real stack, then evaluate it and its own random initialisation."""

from __future__ import annotations

import pytest

from service.config import EvaluateConfig, PretrainConfig, with_overrides
from service.evaluation.evaluate import run_evaluation
from service.training.pretrain import run_pretraining

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_pretraining_lifts_knn_and_linear_probe_above_the_random_start(ray_cluster, digits_dir, tmp_path):
    tracking_uri = f"sqlite:///{tmp_path}/mlruns.db"
    cfg = with_overrides(PretrainConfig(), {
        "run_name": "loop", "model.img_size": 64,  # 4x4 tokens: a 75% mask leaves 4 visible
        "data.embedded_dir": str(digits_dir), "data.loader_workers": 0,
        "train.epochs": 25, "train.batch_size_per_worker": 32, "train.blr": 6e-3, "train.warmup_epochs": 2,
        "train.log_every_steps": 50, "train.knn_k": 0, "train.val_every_epochs": 25,
        "dist.num_workers": 2, "dist.use_gpu": False,
        "checkpoint.storage_path": str(tmp_path / "runs"), "checkpoint.every_steps": 10_000,
        "mlflow.tracking_uri": tracking_uri, "mlflow.system_metrics": False, "mlflow.recon_every_epochs": 25,
        "mlflow.registered_model_name": "loop-tiny",
    }).validate()
    pretrained = run_pretraining(cfg)
    assert pretrained.registered_uri == "models:/loop-tiny/1"

    def evaluate(model: str) -> dict[str, float]:
        eval_cfg = EvaluateConfig(model=model, tracking_uri=tracking_uri, data=cfg.data)
        return run_evaluation(eval_cfg, device="cpu").metrics

    trained = evaluate(pretrained.registered_uri)
    start = evaluate("random:convmae_tiny:64")  # seed 0: the pretraining's own starting weights
    print(f"pretrained {trained}\nrandom init {start}")
    assert trained["eval/knn_top1"] > start["eval/knn_top1"] + 0.05
    assert trained["eval/linear_probe_top1"] > start["eval/linear_probe_top1"] + 0.05
    assert trained["eval/recon_loss"] < 0.7 * start["eval/recon_loss"]
