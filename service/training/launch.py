"""Starting one of our Ray Train jobs (pretraining, fine-tuning): cluster, devices, run storage,
MLflow run, trainer.

For the drivers of ``TrainingJobConfig`` jobs. Also what else such a driver hands its workers
and Tune trials: absolute data locations, storage filesystems without secrets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.config import (
    ConfigError,
    StorageConfig,
    TrainingJobConfig,
    flatten,
    redact_url,
    redacted,
)
from service.data.scratch import sweep_stale_scratch
from service.job_errors import raise_user_error_behind
from service.runtime.cluster import (
    connect_ray,
    preemption_watched,
    ray_stop_handlers,
    require_shared_storage,
    resolve_precision,
    resolve_use_gpu,
    scaling_config,
    worker_runtime_env,
)
from service.runtime.credentials import share_credentials
from service.runtime.placement import (
    check_placement,
    cluster_capacity,
    ray_train_placement_deadline,
    wait_for_placement,
)
from service.tracking import RunStopped, Tracker, open_run, resolve_tracking_uri, warm_up
from service.tracking.provenance import provenance
from service.training.checkpoints import STATE_FILE, check_resumable
from service.training.lease import LEASE_FILES, RunLease
from service.training.resume import RunStorage, newest_train_state, set_aside_unusable_snapshot
from service.training.settings import WorkerSettings

log = logging.getLogger(__name__)

LEASE_FILE_PREFIXES = tuple(LEASE_FILES)  # the lease, its lock and its files being written
RUN_NAME_TAG = "convmae.run_name"
STORAGE_TAG = "convmae.storage_path"

@dataclass
class Launch:
    use_gpu: bool
    precision: str  # resolved: bf16 / fp16 / fp32
    compile_model: bool  # resolved dist.compile
    storage_path: str  # for Ray's RunConfig (a local path, or a path inside storage_fs)
    storage_fs: Any  # pyarrow filesystem for object storage, None for local paths
    storage_label: str  # checkpoint.storage_path/run_name as users wrote it, less any user:password@
    tracking_uri: str
    tracker: Tracker  # the job's MLflow run (disabled when MLflow is off or down)
    lease: RunLease | None = None  # this driver's hold on the run's storage (None: its sweep holds one)
    trains: dict[str, str] = dataclasses.field(default_factory=dict)  # what the run trains (TrainState.trains)

    def release(self) -> None:
        """Gives up the run's lease; drivers call it when the run ends, also on failure."""
        if self.lease is not None:
            self.lease.release()

    @contextlib.contextmanager
    def running(self) -> Iterator[Launch]:
        """The run's lifetime in a driver: its MLflow run ends with the status it deserves
        (FINISHED; KILLED when stopped; FAILED with the error), and its lease is released."""
        try:
            with self.tracker.ending_run():
                yield self
        finally:
            self.release()

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id if self.tracker.enabled else None

    def worker_settings(self, cfg: TrainingJobConfig, *, train_url: str, val_url: str | None,
                        job_inputs: Any = None) -> WorkerSettings:
        """What every worker gets: the config, devices, base lr, data URLs, MLflow run, a reference
        to the driver's credentials (``service.runtime.credentials``), plus the job's own inputs."""
        return WorkerSettings(
            config=cfg, use_gpu=self.use_gpu, precision=self.precision, compile_model=self.compile_model,
            lr=cfg.learning_rate, train_url=train_url, val_url=val_url, tracking_uri=self.tracking_uri,
            mlflow_run_id=self.run_id, credentials=share_credentials(), job_started_at=process_started_at(),
            watch_preemption=preemption_watched(), job_inputs=job_inputs, trains=self.trains,
        )


def worker_count(cfg: TrainingJobConfig) -> str:
    """``3``, or ``2 to 3`` for an elastic run."""
    d = cfg.dist
    return str(d.num_workers) if d.min_workers in (None, d.num_workers) else f"{d.min_workers} to {d.num_workers}"


def process_started_at() -> float:
    """When this driver process started (epoch seconds): the job's start as its user sees it,
    imports included, for the workers' time-to-first-step."""
    import psutil

    return psutil.Process().create_time()


def open_launch(cfg: TrainingJobConfig, *, train_url: str, parent_run_id: str | None = None,
                tags: dict[str, str] | None = None, hold_lease: bool = True,
                model: str = "") -> Launch:
    """Checks the run's storage, takes the run's lease (``hold_lease``; a second driver of the
    same run stops here, before any Ray work), checks that its checkpoints (if any) are this
    run's and resumable, connects to (or starts) Ray, resolves devices and precision, and opens
    (or, when resuming, reopens) its MLflow run with the config logged.

    ``model``: what model the run trains, in words (pretraining: preset and image size;
    fine-tuning: the pretrained model it starts from); with ``train_url``, what the run trains.

    The caller releases the lease (``Launch.release``) when the run ends, whatever the outcome.
    """
    sweep_stale_scratch()  # what killed jobs of this machine left in its temp directory
    # Storage first: an unreachable or read-only storage_path would otherwise surface only at
    # the first checkpoint, after the cluster started and a run was opened.
    require_writable(cfg.checkpoint.storage_path, cfg.storage, "checkpoint.storage_path")
    storage_path, storage_fs = storage_location(cfg.checkpoint.storage_path, cfg.storage)
    storage_label = redact_url(cfg.checkpoint.storage_path.rstrip("/") + "/" + cfg.run_name)
    lease = None
    if hold_lease:
        lease = RunLease(cfg.checkpoint.storage_path, cfg.run_name, cfg.storage,
                         timeout_s=cfg.checkpoint.lease_timeout_s).acquire()
    try:
        trains = {"data": redact_url(train_url), "model": model}
        if not cfg.checkpoint.resume:
            _refuse_existing_run(storage_path, storage_fs, cfg)
        else:
            folder, fs = run_folder(storage_path, storage_fs, cfg.run_name)
            # Ray Train refuses to start on a snapshot it cannot read, and would hand the workers a
            # checkpoint outside the run that one names: such a snapshot is set aside.
            set_aside_unusable_snapshot(RunStorage(fs, folder))
            # Another run's checkpoints, or ones this config cannot resume: stop here, naming the
            # flags, before the cluster starts and the MLflow run is reopened.
            check_resumable(newest_train_state(folder, fs, STATE_FILE), cfg, storage_label, trains)
        tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
        # MLflow's import and store set-up (seconds) overlap Ray's start, which mostly waits.
        mlflow_ready = warm_up(tracking_uri, cfg.mlflow.experiment) if cfg.mlflow.enabled else None
        try:
            connect_ray(cfg.dist.ray_address)
        finally:
            if mlflow_ready is not None:
                mlflow_ready.join()
        # Before any work: on several nodes, every location must be one they all reach.
        require_shared_storage(shared_locations(cfg, train_url, tracking_uri), cfg.storage.shared_local_paths)
        use_gpu = resolve_use_gpu(cfg)
        precision = resolve_precision(cfg, use_gpu)
        check_placement(cfg, use_gpu, cluster_capacity())  # a run the cluster can never hold opens no MLflow run
        compile_model = cfg.dist.compile if cfg.dist.compile is not None else use_gpu
        tracker = open_run(tracking_uri, cfg.mlflow.experiment,
                           identity=run_identity(cfg.run_name, storage_label), run_name=cfg.run_name,
                           resume=cfg.checkpoint.resume, parent_run_id=parent_run_id, tags=tags,
                           enabled=cfg.mlflow.enabled)
        log_config(tracker, cfg, train_url=train_url, precision=precision, use_gpu=use_gpu,
                   tags={"compile": str(compile_model), **(tags or {})})
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    return Launch(use_gpu, precision, compile_model, storage_path, storage_fs, storage_label, tracking_uri, tracker,
                  lease, trains)


def shared_locations(cfg: TrainingJobConfig, train_url: str, tracking_uri: str) -> dict[str, str]:
    """The job's locations every worker reads or writes, by the flag that sets each."""
    locations = {"checkpoint.storage_path": cfg.checkpoint.storage_path, "data.url": train_url}
    if cfg.data.val_url:
        locations["data.val_url"] = absolute_url(cfg.data.val_url) or cfg.data.val_url
    if cfg.mlflow.enabled:
        locations["mlflow.tracking_uri"] = tracking_uri
    return locations


def log_config(tracker: Tracker, cfg: TrainingJobConfig, *, train_url: str, precision: str, use_gpu: bool,
               tags: dict[str, str] | None = None) -> None:
    """The run's config as params and ``config.json``, and its lineage as tags, with URLs
    stripped of any ``user:password@`` (MLflow shows all of it to every reader)."""
    tracker.log_params(flatten(cfg, redact=True))
    tracker.log_dict(redacted(cfg), "config.json")
    tracker.set_tags({"data.train_url": redact_url(train_url), **provenance(), "precision": precision,
                      "use_gpu": use_gpu, **(tags or {})})


def run_identity(run_name: str, storage_label: str) -> dict[str, str]:
    """The MLflow tags that name a training run: its name and where its checkpoints live."""
    return {RUN_NAME_TAG: run_name, STORAGE_TAG: storage_label}


def fit_workers(worker: Callable[[WorkerSettings], None], settings: WorkerSettings, cfg: TrainingJobConfig,
                launch: Launch, callbacks: list[Any] | None = None,
                stop_requested: Callable[[], bool] | None = None) -> Any:
    """Runs ``worker(settings)`` on ``cfg.dist.num_workers`` Ray Train workers (elastic runs: as
    many as the cluster can place, ``dist.min_workers`` at least); returns Ray's ``Result`` (last
    reported metrics and checkpoint, kept ``checkpoint.keep_last`` deep).

    ``stop_requested``: whether the caller has stopped this run (a sweep's trial stopped by
    Tune); the Train run's death is then that stop (``RunStopped``), not its error."""
    import functools

    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchTrainer

    # The wait for room happens here, where Ctrl+C stops it and a deadline ends it, not in
    # Ray Train's controller (service.runtime.placement says why).
    wait_for_placement(cfg, launch.use_gpu)

    trainer = TorchTrainer(
        functools.partial(worker, settings),
        scaling_config=scaling_config(cfg, launch.use_gpu),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=launch.storage_path,
            storage_filesystem=launch.storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            # A worker lost with its node counts against dist.max_failures; a node drained for
            # preemption (its workers checkpoint first) against Ray's own preemption budget.
            # Failing to start the worker group (its placement timed out, a worker died while
            # starting) is retried as often as a failed worker: Ray Train's default is for ever.
            failure_config=FailureConfig(max_failures=cfg.dist.max_failures,
                                         controller_failure_limit=cfg.dist.max_failures),
            callbacks=callbacks,
            worker_runtime_env=worker_runtime_env(),
            # Ray Train's INFO lines (resource requests, each report and checkpoint) go to its
            # session log files only; its warnings and errors still reach the job's output.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    log.info("launching %s %s worker(s); checkpoints under %s; MLflow %s run %s", worker_count(cfg),
             "GPU" if launch.use_gpu else "CPU", launch.storage_label, redact_url(launch.tracking_uri), launch.run_id)
    try:
        with ray_train_placement_deadline(cfg), ray_stop_handlers():
            result = trainer.fit()
    except Exception as exc:
        if stop_requested is not None and stop_requested():
            # Tune frees a stopped trial's placement group, which destroys the Train controller
            # inside it: the ActorDiedError that follows is the stop, and says nothing more.
            raise RunStopped(f"{cfg.run_name} was stopped by its caller") from None
        # Bad input a worker found (a damaged shard, a refused checkpoint) is the job's bad input,
        # reported in one line, and the error the MLflow run fails with, not Ray's wrapper.
        raise_user_error_behind(exc)
        raise
    if getattr(result, "error", None) is not None:
        # Ray Train V2 raises a failed run's error itself; a Result that only carries one
        # (Ray Train V1, Tune) is the same failure and must not pass for a finished run.
        raise result.error
    return result


# ---------------------------------------------------------------- pieces


def require_one_step(num_samples: int, cfg: TrainingJobConfig, train_url: str) -> None:
    """Raises DataError, naming both numbers, unless the training data set holds one optimizer
    step's global batch: workers drop an epoch's incomplete batches, so a smaller data set would
    start the cluster only for every worker to fail on its first epoch."""
    from service.data import DataError

    t = cfg.train
    if num_samples < cfg.effective_batch_size:
        raise DataError(
            f"data.url={redact_url(train_url)!r} has {num_samples} samples, fewer than one global batch of "
            f"{cfg.effective_batch_size} (train.batch_size_per_worker={t.batch_size_per_worker} x "
            f"dist.num_workers={cfg.dist.num_workers} x train.grad_accum_steps={t.grad_accum_steps}); "
            "use a larger data set or a smaller batch"
        )


def require_writable(url: str, storage: StorageConfig, key: str) -> None:
    """Raises DataError, naming ``key`` and ``url``, unless the storage location can be written
    now; it fails within seconds on an unreachable endpoint, and never creates a bucket."""
    from service.data import storage_options
    from service.data.storage import check_writable, redact_url

    check_writable(absolute_url(url) or url, storage_options(storage), name=f"{key}={redact_url(url)!r}")


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


def run_folder(storage_path: str, storage_fs: Any, run_name: str) -> tuple[str, Any]:
    """The run's folder of checkpoints and its pyarrow filesystem."""
    import pyarrow.fs

    return f"{storage_path}/{run_name}", storage_fs or pyarrow.fs.LocalFileSystem()


def _refuse_existing_run(storage_path: str, storage_fs: Any, cfg: TrainingJobConfig) -> None:
    import pyarrow.fs

    fs = storage_fs or pyarrow.fs.LocalFileSystem()
    folder = f"{storage_path}/{cfg.run_name}"
    if fs.get_file_info(folder).type == pyarrow.fs.FileType.NotFound:
        return
    # The run's own lease (taken just before) does not make it a run with checkpoints.
    entries = fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    if any(not e.base_name.startswith(LEASE_FILE_PREFIXES) for e in entries):
        raise ConfigError(
            f"run_name={cfg.run_name!r} already has checkpoints under {cfg.checkpoint.storage_path}; "
            "choose a new run_name, or set checkpoint.resume=true to continue it"
        )
