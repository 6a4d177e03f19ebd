"""The pretraining driver: validated config in, trained and registered model out.

Runs on the Ray driver (``python jobs/pretrain.py`` or ``ray job submit``). It checks the data
and config before any cluster work, opens the MLflow run, launches the Ray Train
``TorchTrainer`` whose workers run ``service.train_loop.train_worker``, and at the end exports
the consolidated model from the last checkpoint and registers it.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service import distributed
from service.config import PretrainConfig, flatten, to_dict
from service.tracking import Tracker, ensure_experiment, resolve_tracking_uri

log = logging.getLogger("convmae.pretrain")

RUN_NAME_TAG = "convmae.run_name"
STORAGE_TAG = "convmae.storage_path"


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


def run_storage(cfg: PretrainConfig):
    """(storage_path, pyarrow filesystem or None) of the run's checkpoints."""
    return storage_location(cfg.checkpoint.storage_path, cfg.data)


def _find_or_create_mlflow_run(cfg: PretrainConfig, tracking_uri: str, storage: str,
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


def run_pretraining(
    cfg: PretrainConfig,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    callbacks: list[Any] | None = None,
) -> PretrainResult:
    """Trains ``cfg`` on the Ray cluster (local when none is given) and registers the model."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from service import data as data_lib
    from service.train_loop import train_worker

    cfg.validate()
    train_url, val_url = (_absolute(u) for u in data_lib.resolve_data_urls(cfg.data))
    train_set = data_lib.open_dataset(train_url, cfg.data)  # a missing bucket fails here, not in a worker
    if val_url:
        data_lib.open_dataset(val_url, cfg.data)
    log.info("data: %s (%d samples in %d shards)%s", train_url, train_set.num_samples, train_set.num_shards,
             f", validation {val_url}" if val_url else "")

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
                      "use_gpu": use_gpu})

    loop_config = {
        "config": to_dict(cfg),
        "use_gpu": use_gpu,
        "precision": precision,
        "lr": cfg.learning_rate,
        "train_url": train_url,
        "val_url": val_url,
        "tracking_uri": tracking_uri,
        "mlflow_run_id": run_id,
    }
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=distributed.scaling_config(cfg, use_gpu),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            failure_config=FailureConfig(max_failures=cfg.dist.max_failures),
            callbacks=callbacks,
            worker_runtime_env=_worker_env(),
        ),
    )
    log.info("launching %d %s worker(s); checkpoints under %s; MLflow %s run %s",
             cfg.dist.num_workers, "GPU" if use_gpu else "CPU", storage_label, tracking_uri, run_id)
    result = trainer.fit()
    checkpoint = result.checkpoint
    metrics = dict(result.metrics or {})

    registered_uri = model_uri = None
    if checkpoint is not None and run_id is not None and cfg.mlflow.register:
        registered = register_checkpoint(cfg, checkpoint, tracking_uri, run_id, train_url)
        registered_uri, model_uri = registered["registered_uri"], registered["model_uri"]
    if run_id is not None:
        tracker._safe("end run", tracker.client.set_terminated, run_id, "FINISHED")
    return PretrainResult(
        run_name=cfg.run_name,
        storage_path=storage_label,
        checkpoint_path=checkpoint.path if checkpoint is not None else None,
        metrics=metrics,
        mlflow_run_id=run_id,
        tracking_uri=tracking_uri,
        registered_uri=registered_uri,
        model_uri=model_uri,
    )


def _absolute(url: str | None) -> str | None:
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


def _commit() -> str:
    from service.registry import git_commit

    return git_commit()


def _refuse_existing_run(storage_path: str, storage_fs: Any, cfg: PretrainConfig) -> None:
    import pyarrow.fs

    fs = storage_fs or pyarrow.fs.LocalFileSystem()
    info = fs.get_file_info(f"{storage_path}/{cfg.run_name}")
    if info.type != pyarrow.fs.FileType.NotFound:
        from service.config import ConfigError

        raise ConfigError(
            f"run_name={cfg.run_name!r} already has checkpoints under {cfg.checkpoint.storage_path}; "
            "choose a new run_name, or set checkpoint.resume=true to continue it"
        )


def register_checkpoint(cfg: PretrainConfig, checkpoint: Any, tracking_uri: str, run_id: str,
                        train_url: str) -> dict[str, str | None]:
    """Logs the consolidated model of ``checkpoint`` (a Ray Train Checkpoint) to ``run_id`` and
    registers it; on failure warns and returns Nones, since the checkpoint stays the truth."""
    from service.registry import export_checkpoint, log_and_register, write_metadata

    try:
        with checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as tmp:
            model_cfg = _model_config(cfg)
            model_dir = export_checkpoint(folder, model_cfg, Path(tmp) / "convmae")
            write_metadata(model_dir, {"preset": cfg.model.name, "run_name": cfg.run_name,
                                       "train_url": train_url, "config": to_dict(cfg)})
            out = log_and_register(
                model_dir, tracking_uri=tracking_uri, run_id=run_id,
                registered_name=cfg.mlflow.registered_model_name,
                tags={"data": train_url, "git_commit": _commit(), "preset": cfg.model.name,
                      "run_name": cfg.run_name},
                metadata={"preset": cfg.model.name},
            )
            return out
    except Exception as exc:  # the checkpoint stays the source of truth
        log.warning("could not log/register the model in MLflow (%s: %s); the checkpoint is at %s",
                    type(exc).__name__, exc, checkpoint.path)
        return {"registered_uri": None, "model_uri": None, "version": None}


def _model_config(cfg: PretrainConfig) -> dict[str, Any]:
    """The convmae config dict of the preset with this run's overrides, built without weights."""
    import dataclasses

    from convmae import PRESETS

    base = PRESETS[cfg.model.name]()
    return dataclasses.replace(base, img_size=cfg.model.img_size, norm_pix_loss=cfg.model.norm_pix_loss).to_dict()
