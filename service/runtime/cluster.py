"""The Ray cluster as the driver sees it: joining or starting it, devices, worker resources.

Distributed set-up lives in ``service.runtime``: this module for the driver's side,
``worker`` for what a training worker asks once (rank, device, collectives), ``engine`` for
everything DeepSpeed. Model and data code never ask for ranks.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.config import ConfigError, TrainingJobConfig, redact_url
from service.runtime.credentials import is_secret_env
from service.runtime.logs import quiet_forwarded_noise

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
# Joining a cluster: how long its port may refuse connections (a head node starting), and how
# long ``ray.init`` may take in all.
PORT_PROBE_S = 10.0
CONNECT_TIMEOUT_S = 60.0

_local_cluster: dict[str, str | None] = {"gcs_address": None}  # the cluster this process started


def connect_ray(address: str | None = None, *, num_cpus: int | None = None,
                timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Joins the cluster at ``address`` / ``RAY_ADDRESS``, or starts a local one on this machine.

    Without an address a run always starts its own cluster: Ray's own default would join
    whatever cluster ``/tmp/ray/ray_current_cluster`` names (another user's, or one that is gone).
    ``address="local"`` means the same. Joining gives up after ``timeout_s`` with a ConfigError
    naming the address.
    """
    import ray

    if ray.is_initialized():
        return
    key = "dist.ray_address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if address and address != "local":
        _join_ray(address, key, timeout_s, kwargs)
    else:
        _start_local_ray(num_cpus, kwargs)
    quiet_forwarded_noise()  # Ray prints its workers' lines from here on


def started_local_cluster() -> bool:
    """Whether this process is connected to the local cluster it started (``connect_ray``
    without an address): one that is this machine and cannot grow."""
    import ray

    return (ray.is_initialized() and _local_cluster["gcs_address"] is not None
            and ray.get_runtime_context().gcs_address == _local_cluster["gcs_address"])


# What to give instead when an address cannot be joined (often the dashboard's, which is for
# `ray job submit`).
JOIN_HINT = ("; a job joins a head's GCS address (host:port, printed by `ray start --head`), the dashboard's "
             "http:// address is for `ray job submit`; unset both to start a local cluster")


def _join_ray(address: str, key: str, timeout_s: float, kwargs: dict[str, Any]) -> None:
    """``ray.init(address=...)`` with a deadline.

    Ray retries an address where no cluster answers for ever (its GCS client waits, times out
    and starts again), so a mistyped address would hang the job, and its run's lease with it.
    So the address's port is tried first (seconds), and ``ray.init`` runs in a thread the
    driver stops waiting for after ``timeout_s`` (the job then exits; the thread dies with it).
    Ray sets no SIGTERM handler from that thread, which leaves the job's own in place (its
    warning saying so is known noise, ``service.runtime.logs``).
    """
    import ray

    _require_listening(address, key, min(PORT_PROBE_S, timeout_s))
    outcome: list[BaseException | None] = []

    def join() -> None:
        try:
            ray.init(address=address, **kwargs)
            outcome.append(None)
        except BaseException as exc:  # handed to the waiting driver
            outcome.append(exc)

    thread = threading.Thread(target=join, name="ray-connect", daemon=True)
    thread.start()
    thread.join(timeout_s)  # Ctrl+C interrupts it
    if not outcome:
        raise ConfigError(f"{key}={redact_url(address)!r}: no Ray cluster answered there within {timeout_s:g} s "
                          "(something listens on that port, but Ray could not join it); check the address")
    if outcome[0] is not None:
        exc = outcome[0]
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"{key}={redact_url(address)!r}: cannot join the Ray cluster there "
                          f"({type(exc).__name__}: {detail}){JOIN_HINT}") from exc


def _require_listening(address: str, key: str, timeout_s: float) -> None:
    """Raises ConfigError unless something accepts connections at ``address``'s host:port
    within ``timeout_s`` (retried: a head node may be starting)."""
    import socket

    host, sep, port = address.split("://")[-1].rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray resolves them itself
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(0.1, deadline - time.monotonic())):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ConfigError(f"{key}={redact_url(address)!r}: no Ray cluster there: nothing accepts connections "
                                  f"at {host}:{port} ({type(exc).__name__}: {exc}); start the cluster or fix the "
                                  "address" + (JOIN_HINT if "://" in address else "")) from None
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


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
    _local_cluster["gcs_address"] = ray.get_runtime_context().gcs_address
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


def worker_resources(cfg: TrainingJobConfig, use_gpu: bool) -> dict[str, float]:
    """What one training worker reserves on its node."""
    resources: dict[str, float] = {"CPU": cfg.dist.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.dist.gpus_per_worker
    return resources


def scaling_config(cfg: TrainingJobConfig, use_gpu: bool):
    """Ray Train's scaling: ``dist.num_workers`` workers, or for an elastic run (``dist.min_workers``
    below it) a (min, max) range that Ray Train resizes within (restarting the workers from the
    newest checkpoint) as nodes go and come back."""
    from ray.train import ScalingConfig

    d, resources = cfg.dist, worker_resources(cfg, use_gpu)
    if not elastic_scaling(cfg):
        return ScalingConfig(num_workers=d.num_workers, use_gpu=use_gpu, resources_per_worker=resources)
    return ScalingConfig(num_workers=(d.min_workers, d.num_workers), use_gpu=use_gpu, resources_per_worker=resources,
                         elastic_resize_monitor_interval_s=d.resize_check_s)


def elastic_scaling(cfg: TrainingJobConfig) -> bool:
    """Whether the run is elastic: ``dist.min_workers`` below ``dist.num_workers``."""
    return cfg.dist.min_workers is not None and cfg.dist.min_workers != cfg.dist.num_workers


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


@contextmanager
def ray_stop_handlers() -> Iterator[None]:
    """Around Ray Train's ``fit`` (and Tune's): a Ctrl+C that Ray's own handler answers leaves
    the block as ``KeyboardInterrupt``, like every other stop, and the job's SIGINT handler is
    back when it ends.

    Ray Train (V2) installs a SIGINT handler for its run: it aborts the run (its workers stop,
    their checkpoints stay: the same command resumes) and then calls ``sys.exit(0)``, so the
    job would unwind as if it had finished (and exit 0, or 1 as Ray's shutdown has it) instead
    of 130 with one line. Both Ray Train and Tune also leave their handler installed after
    ``fit`` (Tune's until its first Ctrl+C): a Ctrl+C while the job registers its model would
    only abort an ended run. Signal handlers belong to the main thread; elsewhere (a sweep's
    trial) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SystemExit as exc:
        # Nothing in the block exits on purpose; a SystemExit there is Ray Train's handler (see
        # data_parallel_trainer.py: _register_sigint_handler): a Ctrl+C.
        raise KeyboardInterrupt from exc
    finally:
        signal.signal(signal.SIGINT, previous)
