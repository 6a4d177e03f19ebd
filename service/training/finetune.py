"""Fine-tuning driver: a pretrained encoder in, a trained and registered classifier out.

End-to-end classification fine-tuning as in the paper (ConvMAE ``FINETUNE.md``): the encoder
plus a fresh linear head on the pooled tokens, AdamW with layer-wise lr decay, drop path,
Mixup/CutMix and label smoothing, linear warmup then cosine decay. It runs like pretraining:
Ray Train ``TorchTrainer`` workers (``service.training.finetune_worker``) with a DeepSpeed ZeRO engine,
checkpoints through ``ray.train.report`` (resumable), an MLflow run with params and metrics,
and at the end the consolidated classifier is logged and registered (``models:/`` loads it as
a ``ConvMAEBackbone`` with its head).

Not implemented from the recipe: RandAugment and random erasing (the data layer's
RandomResizedCrop + flip is the only augmentation); see README.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.config import ConfigError, FinetuneConfig, redact_url, redacted
from service.tracking import resolve_tracking_uri

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    run_name: str
    checkpoint_path: str | None
    metrics: dict[str, Any]  # last report: val/top1, val/top1_start, val/loss, train/loss, step...
    num_classes: int
    source: str  # the pretrained model, described
    mlflow_run_id: str | None
    tracking_uri: str
    registered_uri: str | None
    model_uri: str | None


def run_finetuning(cfg: FinetuneConfig, *, callbacks: list[Any] | None = None) -> FinetuneResult:
    """Fine-tunes ``cfg.model`` on ``cfg.data`` on the Ray cluster and registers the classifier."""
    import ray

    from convmae import ConvMAEConfig
    from service import data as data_lib
    from service.models.source import load_model_source
    from service.training.finetune_worker import FinetuneInputs, finetune_worker
    from service.training.launch import absolute_url, fit_workers, open_launch, require_one_step

    cfg.validate()
    train_url, val_url = (absolute_url(u) for u in data_lib.resolve_data_urls(cfg.data, cfg.storage))
    train_set = data_lib.open_dataset(train_url, cfg.storage)
    require_one_step(train_set.num_samples, cfg, train_url)
    if not train_set.has_labels:
        raise ConfigError(f"data.url={train_url!r} has no labels (.cls); fine-tuning needs a labeled "
                          "data set (prepare one from a class/xxx.jpg folder)")
    if val_url and not data_lib.open_dataset(val_url, cfg.storage).has_labels:
        raise ConfigError(f"data.val_url={val_url!r} has no labels (.cls)")
    num_classes = cfg.num_classes or train_set.num_classes
    if train_set.num_classes > num_classes:
        raise ConfigError(f"num_classes={cfg.num_classes} is not allowed: the data set has {train_set.num_classes} "
                          "classes (0 takes the data set's)")
    if num_classes < 2:
        raise ConfigError(f"num_classes={num_classes}: the data set has fewer than 2 classes; set num_classes")

    source = load_model_source(cfg.model, tracking_uri=resolve_tracking_uri(cfg.mlflow.tracking_uri),
                               preset=cfg.model_preset or None, seed=cfg.train.seed,
                               storage_options=data_lib.storage_options(cfg.storage))
    if not isinstance(source.config, ConvMAEConfig):
        raise ConfigError(f"model={redact_url(cfg.model)!r} is the plain-ViT MAE baseline: fine-tuning takes a "
                          "ConvMAE model (its backbone is a ConvMAEBackbone); the baseline is for pretraining "
                          "comparisons, scored with jobs/evaluate.py")
    model_config = source.config.replace(img_size=cfg.img_size or source.config.img_size)
    log.info("fine-tuning %s on %s (%d samples, %d classes)%s", source.describe(), redact_url(train_url),
             train_set.num_samples, num_classes, f", validation {redact_url(val_url)}" if val_url else "")

    lineage = {"convmae.source_model": redact_url(cfg.model), "convmae.source_run_id": source.run_id or ""}
    # The pretrained model as loaded (its MLflow run: a models:/NAME/latest names another
    # model after the next registration), and the size it is fine-tuned at.
    launch = open_launch(cfg, train_url=train_url, tags=lineage,
                         model=f"{redact_url(cfg.model)} (run {source.run_id or '-'}) at {model_config.img_size} px")
    with launch.running():  # its MLflow run ends FINISHED, KILLED or FAILED; its lease is released
        launch.tracker.log_params({"num_classes_resolved": num_classes, "img_size_resolved": model_config.img_size})
        # Workers get the pretrained weights through the object store: one download, on the driver.
        init_weights = ray.put({k: v.detach().cpu() for k, v in source.model.state_dict().items()})
        inputs = FinetuneInputs(num_classes=num_classes, model_config=model_config.to_dict(), init_weights=init_weights)
        settings = launch.worker_settings(cfg, train_url=train_url, val_url=val_url, job_inputs=inputs)
        result = fit_workers(finetune_worker, settings, cfg, launch, callbacks)
        checkpoint, run_id = result.checkpoint, launch.run_id

        registered: dict[str, str | None] = {"registered_uri": None, "model_uri": None}
        if checkpoint is not None and run_id is not None and cfg.mlflow.register:
            registered = _register(cfg, checkpoint, model_config, num_classes, train_set.class_names,
                                   launch.tracking_uri, run_id, train_url, source)
    return FinetuneResult(
        run_name=cfg.run_name,
        checkpoint_path=checkpoint.path if checkpoint is not None else None,
        metrics=dict(result.metrics or {}),
        num_classes=num_classes,
        source=source.describe(),
        mlflow_run_id=run_id,
        tracking_uri=launch.tracking_uri,
        registered_uri=registered["registered_uri"],
        model_uri=registered["model_uri"],
    )


def _register(cfg: FinetuneConfig, checkpoint: Any, model_config: Any, num_classes: int,
              class_names: tuple[str, ...], tracking_uri: str, run_id: str, train_url: str,
              source: Any) -> dict[str, str | None]:
    """Exports the classifier of ``checkpoint`` and registers it (once); a failure is a warning."""
    from convmae import ConvMAEBackbone
    from service.tracking.provenance import provenance
    from service.tracking.registry import (
        export_checkpoint,
        register_checkpoint_once,
        write_metadata,
    )

    def export(folder: Path, tmp: Path) -> Path:
        classifier = ConvMAEBackbone(model_config, num_classes=num_classes, global_pool=cfg.global_pool)
        model_dir = export_checkpoint(folder, model_config.to_dict(), tmp / "convmae", model=classifier)
        write_metadata(model_dir, {"task": "classification", "num_classes": num_classes,
                                   "class_names": list(class_names), "source_model": redact_url(cfg.model),
                                   "source_run_id": source.run_id, "run_name": cfg.run_name,
                                   "train_url": redact_url(train_url), "config": redacted(cfg)})
        return model_dir

    return register_checkpoint_once(
        checkpoint, export, tracking_uri=tracking_uri, run_id=run_id,
        registered_name=cfg.mlflow.registered_model_name,
        tags={"data": redact_url(train_url), **provenance(), "task": "classification",
              "source_model": redact_url(cfg.model), "num_classes": str(num_classes), "run_name": cfg.run_name},
        metadata={"task": "classification", "num_classes": num_classes}, what="classifier",
    )
