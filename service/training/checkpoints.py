"""Training checkpoints, persisted and restored through Ray Train.

Every worker writes its share of the engine state (``Engine.save``) into a local folder and
reports it; Ray Train merges the folders of all workers into one checkpoint in the run's
storage (local or s3://) and keeps the last K. Each worker also writes a checksums manifest of its files, last. Restoring takes
the newest intact checkpoint of the run (``service.training.resume``: manifests verified, every
file weights-only with an allow-list, content checked against the engine, ones that are damaged
or do not load skipped with a warning, for the one before) on every worker and
loads model, optimizer, the training position (epoch, batches consumed, step) and each rank's
RNG state. Nothing is unpickled beyond tensors, containers and DeepSpeed's allow-listed types
(``service.runtime.safe_checkpoint``).

Uploads are retried: Ray Train's own upload (``StorageContext.persist_current_checkpoint``)
runs as the report's ``checkpoint_upload_fn``, retried with backoff on transient storage
errors (``storage.max_retries`` times), so a storage outage shorter than the backoff does not
fail the worker. Only when the retries are spent does the error reach Ray Train, which then
fails the worker as before (and restarts it from the last checkpoint if dist.max_failures
allows).

Uploads run in the background (``checkpoint.background_upload``, default on): the checkpoint is
written to local disk while training waits (engine state, train state with the data position,
RNG states, manifest: one consistent snapshot), then reported with Ray Train's
``CheckpointUploadMode.ASYNC``, which uploads it from a thread of the worker and deletes the
local copy once uploaded; training goes on meanwhile. At most one upload is in flight: the next
checkpoint first waits for the previous upload to end. Each checkpoint goes to a folder of its
own, and Ray Train registers it (and only then deletes the oldest beyond
``checkpoint.keep_last``) once its upload succeeded, so an upload cut off midway never touches
the previous checkpoint; the half-written folder lacks files or manifests, and resuming skips it
(``service.training.resume``).
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.config import ConfigError, TrainingJobConfig
from service.data.scratch import scratch_dir
from service.data.storage import retrying
from service.runtime.engine import Engine
from service.runtime.safe_checkpoint import DamagedCheckpointError, safe_load, write_manifest
from service.runtime.worker import world_size
from service.training.resume import RunStorage, restore_newest_intact

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
    world_size: int = 0  # workers that wrote it (0: not recorded, older checkpoints)
    zero_stage: int | None = None  # the ZeRO stage they ran (None: not recorded)
    # The lr schedule's step minus ``optimizer_step``: non-zero after resuming on another number
    # of workers, whose schedule has another number of steps per epoch (see run_epochs).
    schedule_offset: int = 0
    # What the run trains (its data, its model): a run of other data or another model under the
    # same run_name must not resume it (see ``resume_problems``). Empty in older checkpoints.
    trains: dict[str, str] = field(default_factory=dict)


def _rng_file(rank: int) -> str:
    return f"rng/rank_{rank:05d}.pt"


class CheckpointWriter:
    """A worker's checkpoints: written locally, then uploaded in the background (or, with
    ``background=False``, while training waits), one upload at a time."""

    def __init__(self, rank: int, *, max_retries: int = 5, background: bool = True) -> None:
        self.rank, self.max_retries, self.background = rank, max_retries, background
        self._uploading: threading.Event | None = None  # set when the upload in flight has ended
        self.waited_s = 0.0  # time training spent waiting for an earlier upload to end

    def save(self, engine: Engine, state: TrainState, metrics: dict[str, Any]) -> None:
        """Writes this worker's shards and reports the checkpoint (a barrier across workers);
        the upload is retried up to ``max_retries`` times on transient storage errors."""
        import ray.train
        from ray.train import CheckpointUploadMode

        self.wait()  # at most one upload in flight
        root = scratch_dir("ckpt")  # removed below, or by Ray Train once uploaded
        try:
            engine.save(root, {"train_state": asdict(state)})
            (root / "rng").mkdir(exist_ok=True)
            torch.save({"torch": torch.get_rng_state()}, root / _rng_file(self.rank))
            if self.rank == 0:
                (root / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
            checkpoint = ray.train.Checkpoint.from_directory(str(root))
            # The manifest (a checksum of every file) is written by the upload, before it copies
            # anything: in the background too, as nothing changes the local files any more.
            upload = functools.partial(_upload, max_retries=self.max_retries, rank=self.rank,
                                       workers=world_size())
            if not self.background:
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_fn=upload)
                return
            ended = threading.Event()
            # Ray Train uploads from its thread and deletes the local copy once uploaded.
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                             delete_local_checkpoint_after_upload=True,
                             checkpoint_upload_fn=functools.partial(upload, ended=ended))
            self._uploading, root = ended, None
        finally:
            if root is not None:  # uploaded while we waited, or never reported
                shutil.rmtree(root, ignore_errors=True)

    def wait(self) -> None:
        """Until the upload in flight (if any) has ended; the loop calls it before finishing."""
        if self._uploading is None:
            return
        start = time.perf_counter()
        self._uploading.wait()
        self._uploading = None
        self.waited_s += time.perf_counter() - start


def _upload(checkpoint: Any, checkpoint_dir_name: str, *, max_retries: int, rank: int, workers: int,
            ended: threading.Event | None = None) -> Any:
    """Ray Train's ``checkpoint_upload_fn``: this worker's checksums manifest, then Ray Train's
    default upload, with retries; sets ``ended`` when done, whether or not it succeeded."""
    import ray.train

    try:
        write_manifest(checkpoint.path, rank=rank, world_size=workers)  # last: it lists every file
        # get_storage() is a Ray DeveloperAPI: the run's StorageContext, whose
        # persist_current_checkpoint is exactly what report() does without an upload function.
        return persist_with_retries(ray.train.get_context().get_storage(), checkpoint, checkpoint_dir_name,
                                    max_retries=max_retries)
    except BaseException:
        if ended is not None:  # Ray keeps a failed upload's local copy; the worker fails anyway
            shutil.rmtree(checkpoint.path, ignore_errors=True)
        raise
    finally:
        if ended is not None:
            ended.set()


def persist_with_retries(storage: Any, checkpoint: Any, checkpoint_dir_name: str, *, max_retries: int,
                         sleep: Callable[[float], None] = time.sleep) -> Any:
    """``storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name)`` (a Ray Train
    ``StorageContext``), retried with backoff on transient errors (unreachable endpoint,
    throttling, 5xx); a missing bucket or a forbidden write fails at once. A retry copies the
    whole folder again, overwriting what a failed attempt left."""
    return retrying(lambda: storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name),
                    what=f"uploading checkpoint {checkpoint_dir_name}", max_retries=max_retries, sleep=sleep)


def restore(engine: Engine, rank: int, *, storage: RunStorage | None = None,
            reported: Any = None) -> TrainState | None:
    """Loads the newest checkpoint of the run that is intact and fits (``service.training.resume``),
    if any; one whose content does not fit this engine (weights missing or of other shapes, a
    malformed train or RNG state) is skipped for the one before it. ``storage``/``reported``:
    the run's folder and Ray's pick, default those of this Ray Train worker."""

    def check(folder: Path) -> None:  # everything load relies on, before the engine takes any of it
        train_state_from(engine.check_state(folder).get("train_state"))
        _rng_state(folder, rank)

    def load(folder: Path) -> TrainState:
        client_state = engine.load(folder)  # weights-only with the allow-list (Engine.load)
        state = train_state_from(client_state.get("train_state"))
        rng = _rng_state(folder, rank)
        if rng is not None:
            torch.set_rng_state(rng)
        return state

    found = restore_newest_intact(load, check=check, state_file=STATE_FILE, storage=storage, reported=reported)
    if found is None:
        return None
    state, checkpoint = found
    log.info("resumed from %s at epoch %d, step %d", checkpoint.label, state.epoch, state.optimizer_step)
    return state


_INT_FIELDS = ("epoch", "optimizer_step", "micro_step", "micro_in_epoch", "samples_seen", "world_size",
               "schedule_offset")


def train_state_from(saved: Any) -> TrainState:
    """The ``TrainState`` a checkpoint saved (its fields of the right types; unknown ones, from
    other versions, left out); raises ``DamagedCheckpointError`` naming the field that is wrong."""

    def wrong(why: str) -> DamagedCheckpointError:
        return DamagedCheckpointError(f"its train state {why}")

    if not isinstance(saved, dict):
        raise wrong(f"is a {type(saved).__name__}, not a mapping" if saved is not None else "is missing")
    fields = {k: v for k, v in saved.items() if k in TrainState.__dataclass_fields__}
    for key in _INT_FIELDS:
        if key in fields and (not isinstance(fields[key], int) or isinstance(fields[key], bool)):
            raise wrong(f"has {key}={fields[key]!r}, not a whole number")
    if fields.get("zero_stage") is not None and not isinstance(fields["zero_stage"], int):
        raise wrong(f"has zero_stage={fields['zero_stage']!r}, not a whole number")
    for key, kinds in (("loader_state", (dict, type(None))), ("extra", (dict,))):
        if key in fields and not isinstance(fields[key], kinds):
            raise wrong(f"has a {type(fields[key]).__name__} as {key}, not a mapping")
    return TrainState(**fields)


def _rng_state(folder: Path, rank: int) -> torch.Tensor | None:
    """This rank's saved torch RNG state, checked to be one ``torch.set_rng_state`` takes (None:
    the checkpoint has none for this rank, as after resharding to more workers)."""
    path = folder / _rng_file(rank)
    if not path.exists():
        return None
    saved = safe_load(path, name=_rng_file(rank))
    state = saved.get("torch") if isinstance(saved, dict) else None
    expected = torch.get_rng_state()
    if not isinstance(state, torch.Tensor) or state.dtype != expected.dtype or state.shape != expected.shape:
        what = f"a {state.dtype} tensor of shape {tuple(state.shape)}" if isinstance(state, torch.Tensor) \
            else f"a {type(state).__name__}"
        raise DamagedCheckpointError(f"{_rng_file(rank)} holds {what} as the torch RNG state, not a "
                                     f"{expected.dtype} tensor of shape {tuple(expected.shape)}")
    return state


def other_run(saved: TrainState, trains: dict[str, str]) -> list[str]:
    """How the run that wrote ``saved`` differs in what it trains from one that trains ``trains``
    (``Launch.trains``): ``data /a/train, not /b``; empty for the same run."""
    return [f"{what} {saved.trains[what]}, not {now}" for what, now in trains.items()
            if what in saved.trains and saved.trains[what] != now]


def resume_problems(saved: TrainState, cfg: TrainingJobConfig) -> list[str]:
    """What keeps a checkpoint with train state ``saved`` from resuming under ``cfg``, each with
    the flag that fixes it; empty when it resumes (on another number of workers too: the engine
    state and the rest of the epoch are resharded)."""
    problems = []
    if saved.zero_stage is not None and saved.zero_stage != cfg.dist.zero_stage:
        problems.append(f"it was written at ZeRO-{saved.zero_stage} (dist.zero_stage={cfg.dist.zero_stage} now), "
                        f"whose optimizer state is laid out for that stage: --dist.zero_stage {saved.zero_stage}")
    loader = saved.loader_state
    if loader:  # mid-epoch: the rest of the epoch is replayed from these settings
        now = {"batch_size": (cfg.train.batch_size_per_worker, "train.batch_size_per_worker"),
               "num_streams": (max(1, cfg.data.loader_workers), "data.loader_workers"),
               "shuffle_window": (max(1, cfg.data.shuffle_buffer), "data.shuffle_buffer"),
               "seed": (cfg.train.seed, "train.seed")}
        for key, (value, flag) in now.items():
            if key in loader and loader[key] != value:
                saved_value = loader[key]
                fix = f"--{flag} {saved_value}" if key != "num_streams" else \
                    f"--{flag} {saved_value if saved_value > 1 else '0 or 1'}"
                problems.append(f"it stopped in the middle of epoch {saved.epoch + 1}, whose remaining batches "
                                f"follow from {flag} ({key} {saved_value} then, {value} now): {fix}")
    return problems


def check_resumable(saved: dict[str, Any] | None, cfg: TrainingJobConfig, where: str,
                    trains: dict[str, str] | None = None) -> None:
    """Raises ConfigError, naming the flags to set, when the newest checkpoint of the run
    (``saved``, its train_state.json; None: none yet) cannot resume under ``cfg``, or belongs to
    a run that trains other data or another model than ``trains``; for drivers, before the
    workers start and before the MLflow run is reopened."""
    if saved is None:
        return
    state = TrainState(**{k: v for k, v in saved.items() if k in TrainState.__dataclass_fields__})
    differences = other_run(state, trains or {})
    if differences:
        # Resuming would train nothing new (or the wrong thing) and register the old run's model
        # under this run's name.
        raise ConfigError(f"run_name={cfg.run_name!r} is another run's: its checkpoints in {where} train "
                          + "; ".join(differences) + ". Give this run its own name (--run_name NAME), or "
                          "remove that folder to start over")
    problems = resume_problems(state, cfg)
    if problems:
        raise ConfigError(f"cannot resume run_name={cfg.run_name!r} from its newest checkpoint in {where} (step "
                          f"{state.optimizer_step}): " + "; ".join(problems)
                          + "; or start over under a new run_name")
    if state.world_size and state.world_size != cfg.dist.num_workers:
        log.info("resuming run %s from a checkpoint of %d worker(s) on %d: its engine state and the rest of "
                 "epoch %d are resharded", cfg.run_name, state.world_size, cfg.dist.num_workers, state.epoch + 1)


def read_train_state(folder: str | Path) -> TrainState:
    return TrainState(**json.loads((Path(folder) / STATE_FILE).read_text()))
