"""Training checkpoints, persisted and restored through Ray Train.

Every worker writes its share of the engine state (``Engine.save``) into a local folder and
reports it; Ray Train merges the folders of all workers into one checkpoint in the run's
storage (local or s3://) and keeps the last K. Each worker also writes a checksums manifest of its files, last. Restoring takes
the newest intact checkpoint of the run (``service.training.resume``: manifests verified, every
file weights-only with an allow-list, damaged ones skipped with a warning) on every worker and
loads model, optimizer, the training position (epoch, batches consumed, step) and each rank's
RNG state. Nothing is unpickled beyond tensors, containers and DeepSpeed's allow-listed types
(``service.runtime.safe_checkpoint``).

Uploads are retried: Ray Train's own upload (``StorageContext.persist_current_checkpoint``)
runs as the report's ``checkpoint_upload_fn``, retried with backoff on transient storage
errors (``storage.max_retries`` times), so a storage outage shorter than the backoff does not
fail the worker. Only when the retries are spent does the error reach Ray Train, which then
fails the worker as before (and restarts it from the last checkpoint if dist.max_failures
allows).
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.data.storage import retrying
from service.runtime.engine import Engine
from service.runtime.safe_checkpoint import safe_load, write_manifest
from service.runtime.worker import world_size
from service.training.resume import restore_newest_intact

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"


@dataclass
class TrainState:
    """Where training stands; restored exactly on resume."""

    epoch: int = 0
    optimizer_step: int = 0  # completed optimizer steps over the whole run
    micro_step: int = 0  # completed micro-batches over the whole run
    micro_in_epoch: int = 0  # micro-batches consumed in ``epoch``
    samples_seen: int = 0  # images consumed, all workers together
    loader_state: dict[str, Any] | None = None  # position inside ``epoch``
    extra: dict[str, Any] = field(default_factory=dict)


def _rng_file(rank: int) -> str:
    return f"rng/rank_{rank:05d}.pt"


def save(engine: Engine, state: TrainState, metrics: dict[str, Any], rank: int, *, max_retries: int = 5) -> None:
    """Writes this worker's shards and reports the checkpoint (a barrier across workers); the
    upload is retried up to ``max_retries`` times on transient storage errors."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="convmae-ckpt-") as tmp:
        root = Path(tmp)
        engine.save(root, {"train_state": asdict(state)})
        (root / "rng").mkdir(exist_ok=True)
        torch.save({"torch": torch.get_rng_state()}, root / _rng_file(rank))
        if rank == 0:
            (root / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        write_manifest(root, rank=rank, world_size=world_size())  # last: it lists every file above
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(root)),
                         checkpoint_upload_fn=functools.partial(_upload, max_retries=max_retries))


def _upload(checkpoint: Any, checkpoint_dir_name: str, *, max_retries: int) -> Any:
    """Ray Train's ``checkpoint_upload_fn``: its default upload, with retries."""
    import ray.train

    # get_storage() is a Ray DeveloperAPI: the run's StorageContext, whose
    # persist_current_checkpoint is exactly what report() does without an upload function.
    return persist_with_retries(ray.train.get_context().get_storage(), checkpoint, checkpoint_dir_name,
                                max_retries=max_retries)


def persist_with_retries(storage: Any, checkpoint: Any, checkpoint_dir_name: str, *, max_retries: int,
                         sleep: Callable[[float], None] = time.sleep) -> Any:
    """``storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name)`` (a Ray Train
    ``StorageContext``), retried with backoff on transient errors (unreachable endpoint,
    throttling, 5xx); a missing bucket or a forbidden write fails at once. A retry copies the
    whole folder again, overwriting what a failed attempt left."""
    return retrying(lambda: storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name),
                    what=f"uploading checkpoint {checkpoint_dir_name}", max_retries=max_retries, sleep=sleep)


def restore(engine: Engine, rank: int) -> TrainState | None:
    """Loads the newest intact checkpoint of the run (``service.training.resume``), if any."""

    def load(folder: Path) -> dict[str, Any]:
        client_state = engine.load(folder)  # weights-only with the allow-list (Engine.load)
        rng_path = folder / _rng_file(rank)
        if rng_path.exists():
            torch.set_rng_state(safe_load(rng_path)["torch"])
        return client_state

    found = restore_newest_intact(load, state_file=STATE_FILE)
    if found is None:
        return None
    client_state, checkpoint = found
    state = TrainState(**client_state["train_state"])
    log.info("resumed from %s at epoch %d, step %d", checkpoint.label, state.epoch, state.optimizer_step)
    return state


def read_train_state(folder: str | Path) -> TrainState:
    return TrainState(**json.loads((Path(folder) / STATE_FILE).read_text()))
