"""Fine-tuning end to end on the real stack: a local Ray cluster with 2 CPU workers running
DeepSpeed ZeRO-2 over gloo, an official-format checkpoint file as the source, the embedded
digits, MLflow tracking and registry in a sqlite store."""

from __future__ import annotations

import argparse

import pytest
import torch
from mlflow import MlflowClient

import convmae
from service.config import ConfigError, FinetuneConfig, with_overrides
from service.training.finetune import run_finetuning

pytestmark = pytest.mark.e2e


def test_finetuning_beats_its_start_and_registers_a_classifier(ray_cluster, digits_dir, tmp_path):
    torch.manual_seed(0)
    pretrained = convmae.build_model("convmae_tiny", img_size=32)
    source = tmp_path / "convmae_official.pth"
    torch.save({"model": convmae.export_official_state_dict(pretrained), "args": argparse.Namespace()}, source)
    tracking_uri = f"sqlite:///{tmp_path}/mlruns.db"
    cfg = with_overrides(FinetuneConfig(), {
        "run_name": "ft", "model": source.as_uri(),
        "data.embedded_dir": str(digits_dir), "data.loader_workers": 0, "data.hflip": False,
        "train.epochs": 3, "train.batch_size_per_worker": 32, "train.blr": 2e-3, "train.warmup_epochs": 0.5,
        "train.log_every_steps": 5,  # Mixup, CutMix, smoothing, layer decay, drop path: the paper's values
        "dist.num_workers": 2, "dist.use_gpu": False,
        "checkpoint.storage_path": str(tmp_path / "runs"), "checkpoint.every_steps": 1000,
        "mlflow.tracking_uri": tracking_uri, "mlflow.system_metrics": False,
        "mlflow.registered_model_name": "digits-classifier",
    }).validate()
    assert cfg.train.mixup == 0.8 and cfg.train.cutmix == 1.0 and cfg.train.layer_decay == 0.65

    result = run_finetuning(cfg)

    start, end = result.metrics["val/top1_start"], result.metrics["val/top1"]
    assert result.num_classes == 10 and result.metrics["epochs_completed"] == 3
    assert start < 0.25  # a fresh head: about chance
    assert end > start + 0.2, f"fine-tuning did not improve: {start:.3f} -> {end:.3f}"

    client = MlflowClient(tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["train.layer_decay"] == "0.65" and run.data.params["num_classes_resolved"] == "10"
    assert run.data.tags["convmae.source_model"] == source.as_uri()
    history = sorted(client.get_metric_history(result.mlflow_run_id, "val/top1"), key=lambda m: m.step)
    assert history[0].step == 0 and history[0].value == pytest.approx(start)
    assert history[-1].value == pytest.approx(end) and len(history) == 4  # start + 3 epochs

    # The registered classifier is what was trained: loaded by models:/, it scores the same.
    from service import data as data_lib
    from service.evaluation.metrics import classification_metrics
    from service.models.source import load_model_source

    registered = load_model_source(result.registered_uri, tracking_uri=tracking_uri)
    assert isinstance(registered.model, convmae.ConvMAEBackbone) and registered.model.num_classes == 10
    assert registered.run_id == result.mlflow_run_id
    _, val_url = data_lib.resolve_data_urls(cfg.data)
    scores = classification_metrics(
        registered.model, data_lib.build_eval_loader(val_url, cfg.data, img_size=32, batch_size=64),
        img_size=32, device=torch.device("cpu"), dtype=torch.float32)
    assert scores["top1"] == pytest.approx(end, abs=1e-6)

    # Its MLflow pyfunc predicts the classifier's logits.
    import mlflow

    images = next(iter(data_lib.build_eval_loader(val_url, cfg.data, img_size=32, batch_size=4)))["images"]
    logits = mlflow.pyfunc.load_model(result.model_uri).predict(images.numpy())
    with torch.no_grad():
        assert torch.allclose(torch.as_tensor(logits), registered.model(images), atol=1e-5)

    # The Ray/DeepSpeed checkpoint folder loads to the same weights.
    from_checkpoint = load_model_source(result.checkpoint_path)
    assert from_checkpoint.kind == "deepspeed" and from_checkpoint.model.num_classes == 10
    a, b = from_checkpoint.model.state_dict(), registered.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fine_tuning_the_mae_baseline_is_refused_by_name(digits_dir, tmp_path):
    # The baseline has no ConvMAEBackbone; the job stops on its config before any worker starts.
    torch.manual_seed(0)
    folder = convmae.save_pretrained(convmae.build_model("mae_tiny", img_size=32), tmp_path / "mae")
    cfg = with_overrides(FinetuneConfig(), {
        "model": str(folder), "data.embedded_dir": str(digits_dir), "data.loader_workers": 0,
        "checkpoint.storage_path": str(tmp_path / "runs"), "mlflow.tracking_uri": f"sqlite:///{tmp_path}/m.db",
    })
    with pytest.raises(ConfigError, match="plain-ViT MAE baseline: fine-tuning takes a ConvMAE model"):
        run_finetuning(cfg)
