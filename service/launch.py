"""Starting one of our Ray Train jobs: cluster, devices, run storage, MLflow run, trainer.

For drivers whose config has ``run_name``, ``data``, ``dist``, ``checkpoint`` and ``mlflow``
sections (fine-tuning; pretraining does the same steps inline in ``service.pretrain``, whose
private helpers these reuse).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service import distributed
from service.config import flatten, to_dict
from service.tracking import Tracker, resolve_tracking_uri

log = logging.getLogger("convmae.launch")


@dataclass
class Launch:
    use_gpu: bool
    precision: str  # resolved: bf16 / fp16 / fp32
    storage_path: str  # for Ray's RunConfig (a local path, or a path inside storage_fs)
    storage_fs: Any  # pyarrow filesystem for object storage, None for local paths
    storage_label: str  # checkpoint.storage_path/run_name, as users wrote it
    tracking_uri: str
    run_id: str | None  # None when MLflow is off or down
    tracker: Tracker


def open_launch(cfg: Any, *, train_url: str, parent_run_id: str | None = None,
                tags: dict[str, str] | None = None) -> Launch:
    """Connects to (or starts) Ray, resolves devices and precision, checks the run's storage,
    and opens (or, when resuming, reopens) its MLflow run with the config logged."""
    from service.pretrain import (
        _commit,
        _find_or_create_mlflow_run,
        _refuse_existing_run,
        run_storage,
    )

    distributed.connect_ray(cfg.dist.ray_address)
    use_gpu = distributed.resolve_use_gpu(cfg)
    precision = distributed.resolve_precision(cfg, use_gpu)
    storage_path, storage_fs = run_storage(cfg)
    storage_label = cfg.checkpoint.storage_path.rstrip("/") + "/" + cfg.run_name
    if not cfg.checkpoint.resume:
        _refuse_existing_run(storage_path, storage_fs, cfg)
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    run_id = _find_or_create_mlflow_run(cfg, tracking_uri, storage_label, parent_run_id, tags or {})
    tracker = Tracker(tracking_uri, run_id, enabled=cfg.mlflow.enabled)
    tracker.log_params(flatten(cfg))
    tracker.log_dict(to_dict(cfg), "config.json")
    tracker.set_tags({"data.train_url": train_url, "git_commit": _commit(), "precision": precision,
                      "use_gpu": use_gpu, **(tags or {})})
    return Launch(use_gpu, precision, storage_path, storage_fs, storage_label, tracking_uri, run_id, tracker)


def fit_workers(worker: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], cfg: Any,
                launch: Launch, callbacks: list[Any] | None = None) -> Any:
    """Runs ``worker`` on ``cfg.dist.num_workers`` Ray Train workers; returns Ray's ``Result``
    (last reported metrics and checkpoint, kept ``checkpoint.keep_last`` deep)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from service.pretrain import _worker_env

    trainer = TorchTrainer(
        worker,
        train_loop_config=loop_config,
        scaling_config=distributed.scaling_config(cfg, launch.use_gpu),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=launch.storage_path,
            storage_filesystem=launch.storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            failure_config=FailureConfig(max_failures=cfg.dist.max_failures),
            callbacks=callbacks,
            worker_runtime_env=_worker_env(),
        ),
    )
    log.info("launching %d %s worker(s); checkpoints under %s; MLflow %s run %s", cfg.dist.num_workers,
             "GPU" if launch.use_gpu else "CPU", launch.storage_label, launch.tracking_uri, launch.run_id)
    return trainer.fit()
