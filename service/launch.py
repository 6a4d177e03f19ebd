"""Starting one of our Ray Train jobs (pretraining, fine-tuning): cluster, devices, run storage,
MLflow run, trainer.

For drivers whose config has ``run_name``, ``data``, ``dist``, ``checkpoint`` and ``mlflow``
sections. Also what else such a driver hands its workers and Tune trials: absolute data
locations, storage filesystems without secrets, the forwarded environment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service import distributed
from service.config import flatten, to_dict
from service.registry import git_commit
from service.tracking import Tracker, ensure_experiment, resolve_tracking_uri

log = logging.getLogger("convmae.launch")

RUN_NAME_TAG = "convmae.run_name"
STORAGE_TAG = "convmae.storage_path"

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

    def loop_config(self, cfg: Any, *, train_url: str, val_url: str | None, **extra: Any) -> dict[str, Any]:
        """What every worker gets: the config, devices, base lr, data URLs, MLflow run, plus ``extra``."""
        return {
            "config": to_dict(cfg),
            "use_gpu": self.use_gpu,
            "precision": self.precision,
            "lr": cfg.learning_rate,
            "train_url": train_url,
            "val_url": val_url,
            "tracking_uri": self.tracking_uri,
            "mlflow_run_id": self.run_id,
            **extra,
        }


def open_launch(cfg: Any, *, train_url: str, parent_run_id: str | None = None,
                tags: dict[str, str] | None = None) -> Launch:
    """Connects to (or starts) Ray, resolves devices and precision, checks the run's storage,
    and opens (or, when resuming, reopens) its MLflow run with the config logged."""
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
    tracker.set_tags({"data.train_url": train_url, "git_commit": git_commit(), "precision": precision,
                      "use_gpu": use_gpu, **(tags or {})})
    return Launch(use_gpu, precision, storage_path, storage_fs, storage_label, tracking_uri, run_id, tracker)


def fit_workers(worker: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], cfg: Any,
                launch: Launch, callbacks: list[Any] | None = None) -> Any:
    """Runs ``worker`` on ``cfg.dist.num_workers`` Ray Train workers; returns Ray's ``Result``
    (last reported metrics and checkpoint, kept ``checkpoint.keep_last`` deep)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

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


# ---------------------------------------------------------------- pieces


def storage_location(url: str, data_cfg: Any):
    """(path, pyarrow filesystem or None) of a local dir or object-storage URL, for Ray's
    ``storage_path``/``storage_filesystem``.

    Object storage goes through the same fsspec/s3fs settings as the data, so one endpoint and
    one set of credentials serve data, checkpoints and sweeps.
    """
    if "://" not in url or url.startswith("file://"):
        local = Path(url.removeprefix("file://")).resolve()
        local.mkdir(parents=True, exist_ok=True)
        return str(local), None
    import fsspec
    import pyarrow.fs

    protocol, _, rest = url.partition("://")
    fs = fsspec.filesystem(protocol, **(persistable_storage_options(data_cfg) if protocol in ("s3", "s3a") else {}))
    return rest.rstrip("/"), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def persistable_storage_options(data_cfg: Any) -> dict[str, Any]:
    """s3fs options without credentials.

    Ray pickles the storage filesystem into its run and experiment state, which lives in the
    bucket; botocore reads the AWS_* credentials from each process's own environment (or
    instance/pod role) instead, so no secret is ever written there.
    """
    from service.data import storage_options

    return {k: v for k, v in storage_options(data_cfg).items() if k not in ("key", "secret", "token")}


def run_storage(cfg: Any):
    """(storage_path, pyarrow filesystem or None) of the run's checkpoints."""
    return storage_location(cfg.checkpoint.storage_path, cfg.data)


def _find_or_create_mlflow_run(cfg: Any, tracking_uri: str, storage: str,
                               parent_run_id: str | None, tags: dict[str, str]) -> str | None:
    """Resuming a run continues its MLflow run; a new run gets a new one. None if MLflow is down."""
    if not cfg.mlflow.enabled:
        return None
    try:
        from mlflow import MlflowClient
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        client = MlflowClient(tracking_uri=tracking_uri)
        experiment_id = ensure_experiment(client, tracking_uri, cfg.mlflow.experiment)
        if cfg.checkpoint.resume:
            existing = client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.run_name}' and tags.`{STORAGE_TAG}` = '{storage}'",
                max_results=1,
            )
            if existing:
                run_id = existing[0].info.run_id
                client.update_run(run_id, status="RUNNING")
                return run_id
        run_tags = {RUN_NAME_TAG: cfg.run_name, STORAGE_TAG: storage, MLFLOW_RUN_NAME: cfg.run_name, **tags}
        if parent_run_id:
            run_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = client.create_run(experiment_id, run_name=cfg.run_name, tags=run_tags)
        return run.info.run_id
    except Exception as exc:
        log.warning("MLflow at %s is unavailable (%s); training continues without tracking", tracking_uri, exc)
        return None


def absolute_url(url: str | None) -> str | None:
    """Workers run in other directories: local data paths must be absolute."""
    if not url or ("://" in url and not url.startswith("file://")):
        return url
    return str(Path(url.removeprefix("file://")).resolve())


def forwarded_env() -> dict[str, str]:
    """The driver's object-store, MLflow client and chaos-testing settings, which the processes
    it starts (workers, Tune trials) inherit."""
    import os

    return {k: v for k, v in os.environ.items() if k.startswith(("CONVMAE_", "MLFLOW_HTTP_", "AWS_"))}


def _worker_env() -> dict[str, Any] | None:
    import os

    env = forwarded_env()
    # A local cluster started from a checkout: let workers import this checkout's packages.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": env}


def _refuse_existing_run(storage_path: str, storage_fs: Any, cfg: Any) -> None:
    import pyarrow.fs

    fs = storage_fs or pyarrow.fs.LocalFileSystem()
    info = fs.get_file_info(f"{storage_path}/{cfg.run_name}")
    if info.type != pyarrow.fs.FileType.NotFound:
        from service.config import ConfigError

        raise ConfigError(
            f"run_name={cfg.run_name!r} already has checkpoints under {cfg.checkpoint.storage_path}; "
            "choose a new run_name, or set checkpoint.resume=true to continue it"
        )
