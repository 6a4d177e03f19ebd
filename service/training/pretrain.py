"""The pretraining driver: validated config in, trained and registered model out.

Runs on the Ray driver (``python jobs/pretrain.py`` or ``ray job submit``). It checks the data
and config before any cluster work, opens the MLflow run, launches the Ray Train
``TorchTrainer`` whose workers run ``service.training.pretrain_worker.train_worker``, and at the end exports
the consolidated model from the last checkpoint and registers it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.config import PretrainConfig, redact_url, redacted
from service.training.launch import absolute_url, fit_workers, open_launch, require_one_step

log = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    run_name: str
    storage_path: str
    checkpoint_path: str | None
    metrics: dict[str, Any]
    mlflow_run_id: str | None
    tracking_uri: str
    registered_uri: str | None
    model_uri: str | None


def run_pretraining(
    cfg: PretrainConfig,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    callbacks: list[Any] | None = None,
    hold_lease: bool = True,
    stop_requested: Callable[[], bool] | None = None,
) -> PretrainResult:
    """Trains ``cfg`` on the Ray cluster (local when none is given) and registers the model.

    ``hold_lease=False``: the caller already holds a lease covering this run (a sweep's trials).
    ``stop_requested``: whether the caller stopped the run (``fit_workers``); the run then ends
    in ``RunStopped`` with its MLflow run left to the caller.
    """
    from service import data as data_lib
    from service.training.pretrain_worker import train_worker

    cfg.validate()
    train_url, val_url = (absolute_url(u) for u in data_lib.resolve_data_urls(cfg.data, cfg.storage))
    train_set = data_lib.open_dataset(train_url, cfg.storage)  # a missing bucket fails here, not in a worker
    require_one_step(train_set.num_samples, cfg, train_url)
    if val_url:
        data_lib.open_dataset(val_url, cfg.storage)
    log.info("data: %s (%d samples in %d shards)%s", redact_url(train_url), train_set.num_samples,
             train_set.num_shards, f", validation {redact_url(val_url)}" if val_url else "")

    launch = open_launch(cfg, train_url=train_url, parent_run_id=parent_run_id, tags=tags, hold_lease=hold_lease,
                         model=f"{cfg.model.name} at {cfg.model.img_size} px")
    with launch.running():  # its MLflow run ends FINISHED, KILLED or FAILED; its lease is released
        settings = launch.worker_settings(cfg, train_url=train_url, val_url=val_url)
        result = fit_workers(train_worker, settings, cfg, launch, callbacks, stop_requested)
        checkpoint = result.checkpoint
        metrics = dict(result.metrics or {})

        registered_uri = model_uri = None
        if checkpoint is not None and launch.run_id is not None and cfg.mlflow.register:
            registered = register_checkpoint(cfg, checkpoint, launch.tracking_uri, launch.run_id, train_url)
            registered_uri, model_uri = registered["registered_uri"], registered["model_uri"]
    return PretrainResult(
        run_name=cfg.run_name,
        storage_path=launch.storage_label,
        checkpoint_path=checkpoint.path if checkpoint is not None else None,
        metrics=metrics,
        mlflow_run_id=launch.run_id,
        tracking_uri=launch.tracking_uri,
        registered_uri=registered_uri,
        model_uri=model_uri,
    )


def register_checkpoint(cfg: PretrainConfig, checkpoint: Any, tracking_uri: str, run_id: str,
                        train_url: str) -> dict[str, str | None]:
    """Logs the consolidated model of ``checkpoint`` (a Ray Train Checkpoint) to ``run_id`` and
    registers it (once per checkpoint); on failure warns and returns Nones."""
    from service.tracking.provenance import provenance
    from service.tracking.registry import (
        export_checkpoint,
        register_checkpoint_once,
        write_metadata,
    )

    def export(folder: Path, tmp: Path) -> Path:
        model_dir = export_checkpoint(folder, _model_config(cfg), tmp / "convmae")
        write_metadata(model_dir, {"preset": cfg.model.name, "run_name": cfg.run_name,
                                   "train_url": redact_url(train_url), "config": redacted(cfg)})
        return model_dir

    return register_checkpoint_once(
        checkpoint, export, tracking_uri=tracking_uri, run_id=run_id,
        registered_name=cfg.registered_name(),
        tags={"data": redact_url(train_url), **provenance(), "preset": cfg.model.name, "run_name": cfg.run_name},
        metadata={"preset": cfg.model.name},
    )


def _model_config(cfg: PretrainConfig) -> dict[str, Any]:
    """The convmae config dict of the preset with this run's overrides, built without weights."""
    import dataclasses

    from convmae import PRESETS

    base = PRESETS[cfg.model.name]()
    return dataclasses.replace(base, img_size=cfg.model.img_size, norm_pix_loss=cfg.model.norm_pix_loss).to_dict()
