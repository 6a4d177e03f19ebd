"""The Ray cluster as the driver sees it: joining or starting it, devices, worker resources.

Distributed set-up lives in ``service.runtime``: this module for the driver's side,
``worker`` for what a training worker asks once (rank, device, collectives), ``engine`` for
everything DeepSpeed. Model and data code never ask for ranks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.config import ConfigError, TrainingJobConfig, redact_url
from service.runtime.credentials import is_secret_env

log = logging.getLogger(__name__)

# The checkout this package runs from: Ray processes started from here import it even when it
# is not pip-installed.
PROJECT_ROOT = str(Path(__file__).resolve().parents[2])
# A local run's cluster is reachable from this machine only.
LOOPBACK = "127.0.0.1"
# Ray Train's node-preemption watcher (an extra actor process per run, and a core-worker
# error line about its restart arguments in every run's log) has nothing to watch on a
# cluster that is this machine alone: a run on it ends with the machine.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def connect_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Joins the cluster at ``address`` / ``RAY_ADDRESS``, or starts a local one on this machine.

    Without an address a run always starts its own cluster: Ray's own default would join
    whatever cluster ``/tmp/ray/ray_current_cluster`` names (another user's, or one that is gone).
    ``address="local"`` means the same.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if address and address != "local":
        ray.init(address=address, **kwargs)
    else:
        _start_local_ray(num_cpus, kwargs)


def _start_local_ray(num_cpus: int | None, kwargs: dict[str, Any]) -> None:
    """A local cluster of this process only: on loopback, found by its own actors.

    Ray Train frees the worker placement group of a trial that Tune stops early through the
    state API (served by the dashboard) at the address the actor finds by itself, which fails
    when another Ray instance runs on the same machine. So the GCS port is chosen here and
    handed to every process as RAY_ADDRESS; and actors import this checkout's packages even
    when it is not pip-installed.
    """
    import socket

    import ray

    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
    env = {
        "PYTHONPATH": with_project_on_path(),
        "RAY_ADDRESS": f"{LOOPBACK}:{port}",
    }
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")  # read by Ray Train in this driver
    try:
        with _loopback_node_ip():
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host=LOOPBACK,
                     _node_ip_address=LOOPBACK, runtime_env={"env_vars": env}, **kwargs)
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:  # a Ray that resolves loopback differently: say so rather than pretend
        log.warning("the local Ray cluster runs on %s, not %s: its ports may be reachable from the network",
                    node_ip, LOOPBACK)


@contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """Lets ``ray.init`` keep 127.0.0.1 as the node address.

    Ray's servers (GCS, raylet, workers, agents) listen on loopback only when the node address
    is 127.0.0.1, but on Linux ``ray.init`` replaces a loopback ``_node_ip_address`` by the
    machine's outward address, unless Ray clusters are disabled (its macOS/Windows mode, the
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` flag, read once when Ray is imported). A local run
    is a one-node cluster, so the flag is lowered for the start-up only.
    """
    from ray._private import ray_constants

    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def resolve_use_gpu(cfg: TrainingJobConfig) -> bool:
    """``dist.use_gpu: null`` means: use GPUs when the cluster has them."""
    use_gpu = cfg.dist.use_gpu if cfg.dist.use_gpu is not None else cluster_has_gpus()
    if use_gpu and not cluster_has_gpus():
        raise ConfigError("dist.use_gpu=true but the Ray cluster has no GPUs; set dist.use_gpu=false")
    if cfg.dist.offload_optimizer and not use_gpu:
        raise ConfigError(
            "dist.offload_optimizer=true needs GPU workers (it moves optimizer state from GPU "
            "to CPU memory); set dist.offload_optimizer=false for CPU training"
        )
    return use_gpu


def resolve_precision(cfg: TrainingJobConfig, use_gpu: bool) -> str:
    precision = cfg.dist.precision
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    if not use_gpu and precision != "fp32":
        raise ConfigError(f"dist.precision={precision!r} needs GPUs; CPU training runs in fp32")
    return precision


def scaling_config(cfg: TrainingJobConfig, use_gpu: bool):
    """Ray Train's scaling: ``dist.num_workers`` workers, or for an elastic run (``dist.min_workers``
    below it) a (min, max) range that Ray Train resizes within (restarting the workers from the
    newest checkpoint) as nodes go and come back."""
    from ray.train import ScalingConfig

    d = cfg.dist
    resources: dict[str, float] = {"CPU": d.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = d.gpus_per_worker
    if d.min_workers is None or d.min_workers == d.num_workers:
        return ScalingConfig(num_workers=d.num_workers, use_gpu=use_gpu, resources_per_worker=resources)
    return ScalingConfig(num_workers=(d.min_workers, d.num_workers), use_gpu=use_gpu, resources_per_worker=resources,
                         elastic_resize_monitor_interval_s=d.resize_check_s)


def preemption_watched() -> bool:
    """Whether Ray Train watches this run's nodes for preemption (drains with a deadline): on
    clusters reached by address, not on the local one a job starts for itself."""
    from ray._private import ray_constants

    return ray_constants.env_bool(PREEMPTION_WATCHER_ENV, True)


# Locations only the process that wrote them can see, whatever the machine.
PROCESS_LOCAL_SCHEMES = ("memory",)
# Locations on the file system of one machine (unless that is a shared mount).
MACHINE_LOCAL_SCHEMES = ("file", "sqlite", "local")


def is_node_local(url: str) -> bool:
    """Whether ``url`` (a data, checkpoint or MLflow location) lives on one machine only."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if url.startswith("file:") and not scheme:
        scheme = "file"  # MLflow's file:relative/path
    return not scheme or scheme in MACHINE_LOCAL_SCHEMES + PROCESS_LOCAL_SCHEMES


def cluster_node_count() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def require_shared_storage(locations: dict[str, str], shared_local_paths: bool = False, *,
                           nodes: int | None = None) -> None:
    """On a cluster of several nodes, raises ConfigError for a location (by the key that sets it)
    that only one node can see: a local path, a sqlite or file MLflow store. The workers, and the
    rank 0 that logs to MLflow, may run on any node, and a run that resumes elsewhere must find its
    checkpoints. ``shared_local_paths``: the user's word that local paths are a shared mount.
    ``nodes``: the cluster's alive nodes (None: asks the connected Ray)."""
    if (cluster_node_count() if nodes is None else nodes) <= 1:
        return
    for key, url in locations.items():
        if not url or not is_node_local(url):
            continue
        in_memory = url.partition("://")[0].lower() in PROCESS_LOCAL_SCHEMES
        if shared_local_paths and not in_memory:
            continue
        advice = ("use a location every node can reach" if in_memory else
                  "on a cluster of several nodes use object storage (--storage.root s3://bucket/prefix, or "
                  f"--{key} s3://...{', an mlflow server http://...' if key.startswith('mlflow') else ''}), "
                  "or, when it is a shared mount every node sees, set --storage.shared_local_paths true")
        raise ConfigError(f"{key}={redact_url(url)!r} is not allowed: it lives on one node only; {advice}")


def with_project_on_path() -> str:
    """``PYTHONPATH`` with this checkout first."""
    return os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get("PYTHONPATH", "")) if p)


def forwarded_env() -> dict[str, str]:
    """The driver's settings its workers and Tune trials get in their runtime env: object-store
    endpoint and region, MLflow client settings, chaos-testing switches.

    Never credentials: Ray logs runtime envs in plain text (``service.runtime.credentials`` says
    how workers get those). URLs lose any ``user:password@`` for the same reason.
    """
    return {k: redact_url(v) for k, v in os.environ.items()
            if k.startswith(("CONVMAE_", "MLFLOW_HTTP_", "AWS_")) and not is_secret_env(k)}


def worker_runtime_env() -> dict[str, Any]:
    """The runtime env of training workers: the forwarded settings and this checkout's packages."""
    return {"env_vars": {**forwarded_env(), "PYTHONPATH": with_project_on_path()}}
