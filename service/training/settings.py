"""What a training job's driver hands each of its Ray Train workers, as one typed value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from service.config import TrainingJobConfig


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker needs besides its rank: the job's config, the devices and precision
    the driver resolved, the base lr, absolute data URLs, the MLflow run, a reference to the
    driver's credentials (``service.runtime.credentials``), and the job's own inputs."""

    config: TrainingJobConfig
    use_gpu: bool
    precision: str  # resolved: bf16 / fp16 / fp32
    compile_model: bool
    lr: float  # the base lr of the global batch (the same at every world size)
    train_url: str
    val_url: str | None
    tracking_uri: str
    mlflow_run_id: str | None
    credentials: Any  # an object reference to the driver's credentials, or None
    job_started_at: float | None  # the driver process's start, epoch seconds
    # Check for a coming preemption at every step boundary (Ray Train's watcher runs: a cluster
    # reached by address) and save a checkpoint before the node goes.
    watch_preemption: bool = False
    job_inputs: Any = None  # what only one job needs (fine-tuning: its FinetuneInputs)
    trains: dict[str, str] = field(default_factory=dict)  # what the run trains, kept in its checkpoints

    def config_at(self, workers: int) -> TrainingJobConfig:
        """The config as ``workers`` workers run it (an elastic run may have fewer than
        ``dist.num_workers``): the same global batch, more accumulation steps."""
        return self.config.at_world_size(workers)
