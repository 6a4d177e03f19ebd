"""The Ray cluster as the driver sees it: joining or starting it, devices, worker resources.

Distributed set-up lives in ``service.runtime``: this module for the driver's side,
``worker`` for what a training worker asks once (rank, device, collectives), ``engine`` for
everything DeepSpeed. Model and data code never ask for ranks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from service.config import ConfigError, TrainingJobConfig

log = logging.getLogger(__name__)

# The checkout this package runs from: Ray processes started from here import it even when it
# is not pip-installed.
PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


def connect_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Joins the cluster at ``address`` / ``RAY_ADDRESS``, or starts a local one on this machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        _start_local_ray(num_cpus, kwargs)


def _start_local_ray(num_cpus: int | None, kwargs: dict[str, Any]) -> None:
    """A local cluster whose own actors can find it.

    Ray Train frees the worker placement group of a trial that Tune stops early through the
    state API (served by the dashboard) at the address the actor finds by itself, which fails
    when another Ray instance runs on the same machine. So the GCS port is chosen here and
    handed to every process as RAY_ADDRESS; and actors import this checkout's packages even
    when it is not pip-installed.
    """
    import socket

    import ray

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        "PYTHONPATH": with_project_on_path(),
        "RAY_ADDRESS": f"127.0.0.1:{port}",
    }
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=True, runtime_env={"env_vars": env}, **kwargs)
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous


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
    from ray.train import ScalingConfig

    resources: dict[str, float] = {"CPU": cfg.dist.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.dist.gpus_per_worker
    return ScalingConfig(num_workers=cfg.dist.num_workers, use_gpu=use_gpu, resources_per_worker=resources)




def with_project_on_path() -> str:
    """``PYTHONPATH`` with this checkout first."""
    return os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get("PYTHONPATH", "")) if p)


def forwarded_env() -> dict[str, str]:
    """The driver's object-store, MLflow client and chaos-testing settings, which the processes
    it starts (workers, Tune trials) inherit."""
    return {k: v for k, v in os.environ.items() if k.startswith(("CONVMAE_", "MLFLOW_HTTP_", "AWS_"))}


def worker_runtime_env() -> dict[str, Any]:
    """The runtime env of training workers: the forwarded settings and this checkout's packages."""
    return {"env_vars": {**forwarded_env(), "PYTHONPATH": with_project_on_path()}}
