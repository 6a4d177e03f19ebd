"""Starting one of our Ray Train jobs (pretraining, fine-tuning): cluster, devices, run storage,
MLflow run, trainer.

For the drivers of ``TrainingJobConfig`` jobs. Also what else such a driver hands its workers
and Tune trials: absolute data locations, storage filesystems without secrets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.config import ConfigError, StorageConfig, TrainingJobConfig, flatten, to_dict
from service.runtime.cluster import (
    connect_ray,
    resolve_precision,
    resolve_use_gpu,
    scaling_config,
    worker_runtime_env,
)
from service.tracking import Tracker, open_run, resolve_tracking_uri
from service.tracking.provenance import provenance

log = logging.getLogger(__name__)

RUN_NAME_TAG = "convmae.run_name"
STORAGE_TAG = "convmae.storage_path"

@dataclass
class Launch:
    use_gpu: bool
    precision: str  # resolved: bf16 / fp16 / fp32
    compile_model: bool  # resolved dist.compile
    storage_path: str  # for Ray's RunConfig (a local path, or a path inside storage_fs)
    storage_fs: Any  # pyarrow filesystem for object storage, None for local paths
    storage_label: str  # checkpoint.storage_path/run_name, as users wrote it
    tracking_uri: str
    tracker: Tracker  # the job's MLflow run (disabled when MLflow is off or down)

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id if self.tracker.enabled else None

    def loop_config(self, cfg: TrainingJobConfig, *, train_url: str, val_url: str | None, **extra: Any) -> dict[str, Any]:
        """What every worker gets: the config, devices, base lr, data URLs, MLflow run, plus ``extra``."""
        return {
            "config": to_dict(cfg),
            "use_gpu": self.use_gpu,
            "precision": self.precision,
            "compile": self.compile_model,
            "lr": cfg.learning_rate,
            "train_url": train_url,
            "val_url": val_url,
            "tracking_uri": self.tracking_uri,
            "mlflow_run_id": self.run_id,
            **extra,
        }


def open_launch(cfg: TrainingJobConfig, *, train_url: str, parent_run_id: str | None = None,
                tags: dict[str, str] | None = None) -> Launch:
    """Connects to (or starts) Ray, resolves devices and precision, checks the run's storage,
    and opens (or, when resuming, reopens) its MLflow run with the config logged."""
    connect_ray(cfg.dist.ray_address)
    use_gpu = resolve_use_gpu(cfg)
    precision = resolve_precision(cfg, use_gpu)
    compile_model = cfg.dist.compile if cfg.dist.compile is not None else use_gpu
    storage_path, storage_fs = storage_location(cfg.checkpoint.storage_path, cfg.storage)
    storage_label = cfg.checkpoint.storage_path.rstrip("/") + "/" + cfg.run_name
    if not cfg.checkpoint.resume:
        _refuse_existing_run(storage_path, storage_fs, cfg)
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    tracker = open_run(tracking_uri, cfg.mlflow.experiment,
                       identity=run_identity(cfg.run_name, storage_label), run_name=cfg.run_name,
                       resume=cfg.checkpoint.resume, parent_run_id=parent_run_id, tags=tags,
                       enabled=cfg.mlflow.enabled)
    tracker.log_params(flatten(cfg))
    tracker.log_dict(to_dict(cfg), "config.json")
    tracker.set_tags({"data.train_url": train_url, **provenance(), "precision": precision,
                      "use_gpu": use_gpu, "compile": compile_model, **(tags or {})})
    return Launch(use_gpu, precision, compile_model, storage_path, storage_fs, storage_label, tracking_uri, tracker)


def run_identity(run_name: str, storage_label: str) -> dict[str, str]:
    """The MLflow tags that name a training run: its name and where its checkpoints live."""
    return {RUN_NAME_TAG: run_name, STORAGE_TAG: storage_label}


def fit_workers(worker: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], cfg: TrainingJobConfig,
                launch: Launch, callbacks: list[Any] | None = None) -> Any:
    """Runs ``worker`` on ``cfg.dist.num_workers`` Ray Train workers; returns Ray's ``Result``
    (last reported metrics and checkpoint, kept ``checkpoint.keep_last`` deep)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        worker,
        train_loop_config=loop_config,
        scaling_config=scaling_config(cfg, launch.use_gpu),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=launch.storage_path,
            storage_filesystem=launch.storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            failure_config=FailureConfig(max_failures=cfg.dist.max_failures),
            callbacks=callbacks,
            worker_runtime_env=worker_runtime_env(),
        ),
    )
    log.info("launching %d %s worker(s); checkpoints under %s; MLflow %s run %s", cfg.dist.num_workers,
             "GPU" if launch.use_gpu else "CPU", launch.storage_label, launch.tracking_uri, launch.run_id)
    result = trainer.fit()
    if getattr(result, "error", None) is not None:
        # Ray Train V2 raises a failed run's error itself; a Result that only carries one
        # (Ray Train V1, Tune) is the same failure and must not pass for a finished run.
        raise result.error
    return result


# ---------------------------------------------------------------- pieces


def storage_location(url: str, storage: StorageConfig):
    """(path, pyarrow filesystem or None) of a local dir or object-storage URL, for Ray's
    ``storage_path``/``storage_filesystem``.

    Object storage goes through the ``storage`` section like the data, so one endpoint and one
    set of credentials serve data, checkpoints and sweeps.
    """
    if "://" not in url or url.startswith("file://"):
        local = Path(url.removeprefix("file://")).resolve()
        local.mkdir(parents=True, exist_ok=True)
        return str(local), None
    import fsspec
    import pyarrow.fs

    protocol, _, rest = url.partition("://")
    fs = fsspec.filesystem(protocol, **(persistable_storage_options(storage) if protocol in ("s3", "s3a") else {}))
    return rest.rstrip("/"), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def persistable_storage_options(storage: StorageConfig) -> dict[str, Any]:
    """s3fs options without credentials.

    Ray pickles the storage filesystem into its run and experiment state, which lives in the
    bucket; botocore reads the AWS_* credentials from each process's own environment (or
    instance/pod role) instead, so no secret is ever written there.
    """
    from service.data import storage_options

    return {k: v for k, v in storage_options(storage).items() if k not in ("key", "secret", "token")}


def absolute_url(url: str | None) -> str | None:
    """Workers run in other directories: local data paths must be absolute."""
    if not url or ("://" in url and not url.startswith("file://")):
        return url
    return str(Path(url.removeprefix("file://")).resolve())


def _refuse_existing_run(storage_path: str, storage_fs: Any, cfg: TrainingJobConfig) -> None:
    import pyarrow.fs

    fs = storage_fs or pyarrow.fs.LocalFileSystem()
    info = fs.get_file_info(f"{storage_path}/{cfg.run_name}")
    if info.type != pyarrow.fs.FileType.NotFound:
        raise ConfigError(
            f"run_name={cfg.run_name!r} already has checkpoints under {cfg.checkpoint.storage_path}; "
            "choose a new run_name, or set checkpoint.resume=true to continue it"
        )
