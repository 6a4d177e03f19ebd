"""Resuming a Ray Train run from its newest intact checkpoint.

``ray.train.get_checkpoint()`` hands a worker the latest checkpoint that Ray Train's controller
*registered*. That is not always the newest one on storage, nor always a usable one:

- A worker uploads its checkpoint folder (``checkpoint_<timestamp>`` under
  ``storage_path/run_name``) during ``ray.train.report``; the controller registers it, and
  records it in ``checkpoint_manager_snapshot.json``, only when it next polls the workers. A run
  stopped in between (Ctrl-C, a killed driver) leaves the newest folder on storage but not in the
  snapshot, so the rerun resumed from the one before and the newest was orphaned.
- The newest folder can be damaged or incomplete (a cut-off upload, a truncated file), or hold
  a file that would execute code when unpickled.

So a resuming worker lists every ``checkpoint_*`` folder of the run (plus Ray's own pick), orders
them by the training position each recorded (``train_state.json``: optimizer step, micro step,
epoch; then by folder name, which is a timestamp), and loads the newest whose manifests verify
and whose files all pass the weights-only allow-list (``service.runtime.safe_checkpoint``). Every
skipped folder is named in a warning. All workers agree on each candidate before loading it, so
they resume from the same one. When checkpoints exist but none is intact, it raises a
``DamagedCheckpointError`` naming each, rather than silently starting over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from service.runtime.safe_checkpoint import (
    CheckpointError,
    DamagedCheckpointError,
    verify_checkpoint,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's folder names: checkpoint_<date and time>


@dataclass
class Candidate:
    checkpoint: Any  # ray.train.Checkpoint
    name: str  # its folder name
    position: tuple[int, int, int] | None  # (optimizer_step, micro_step, epoch) from its train state
    problem: str | None = None  # why it cannot be used, found before downloading it

    @property
    def label(self) -> str:
        """The folder as users know it: a local path, or a URL for object storage."""
        path = str(self.checkpoint.path)
        kind = getattr(self.checkpoint.filesystem, "type_name", "local")
        for scheme in ("s3", "gcs", "abfs", "hdfs"):
            if scheme in kind:
                return f"{'gs' if scheme == 'gcs' else scheme}://{path}"
        return path


def _position(state: dict[str, Any]) -> tuple[int, int, int]:
    return int(state["optimizer_step"]), int(state.get("micro_step", 0)), int(state.get("epoch", 0))


def _read_position(checkpoint: Any, state_file: str) -> tuple[tuple[int, int, int] | None, str | None]:
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{state_file}") as f:
            return _position(json.loads(f.read().decode("utf-8"))), None
    except FileNotFoundError:
        return None, f"it has no {state_file}"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"its {state_file} is unreadable ({type(exc).__name__}: {exc})"


def _stored_checkpoints() -> list[Any]:
    """Every ``checkpoint_*`` folder in this run's storage (Ray Train's experiment folder)."""
    import pyarrow.fs
    import ray.train
    from ray.train import Checkpoint

    storage = ray.train.get_context().get_storage()
    fs, root = storage.storage_filesystem, storage.experiment_fs_path
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True, recursive=False))
    return [Checkpoint(path=info.path, filesystem=fs) for info in infos
            if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith(CHECKPOINT_PREFIX)]


def find_candidates(state_file: str) -> list[Candidate]:
    """Ray's latest checkpoint and every checkpoint folder of the run, newest position first."""
    import ray.train

    found: dict[str, Any] = {}
    reported = ray.train.get_checkpoint()
    if reported is not None:
        found[str(reported.path).rstrip("/")] = reported
    try:
        for checkpoint in _stored_checkpoints():
            found.setdefault(str(checkpoint.path).rstrip("/"), checkpoint)
    except Exception as exc:  # storage not listable: Ray's pick alone
        log.warning("cannot list the run's checkpoints (%s: %s); considering only %s", type(exc).__name__, exc,
                    reported.path if reported is not None else "none")
    candidates = []
    for path, checkpoint in found.items():
        position, problem = _read_position(checkpoint, state_file)
        candidates.append(Candidate(checkpoint, path.rsplit("/", 1)[-1], position, problem))
    # Newest training position first; a folder name is its creation time (ties: the later one).
    candidates.sort(key=lambda c: (c.position is not None, c.position or (0, 0, 0), c.name), reverse=True)
    return candidates


def newest_train_state(run_folder: str, fs: Any, state_file: str) -> dict[str, Any] | None:
    """The train state of the newest checkpoint (by training position) in ``run_folder`` (a
    path in the pyarrow filesystem ``fs``), read on the driver before any worker starts; None
    when the run has no readable one. Unlike a resuming worker it checks nothing else: what it
    reads only decides whether the run can resume with this config at all."""
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(run_folder, allow_not_found=True, recursive=False))
    newest: tuple[tuple[int, int, int], str, dict[str, Any]] | None = None
    for info in infos:
        if info.type != pyarrow.fs.FileType.Directory or not info.base_name.startswith(CHECKPOINT_PREFIX):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{state_file}") as f:
                state = json.loads(f.read().decode("utf-8"))
            key = (_position(state), info.base_name, state)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # incomplete or damaged: the workers skip it too
        if newest is None or key[:2] > newest[:2]:
            newest = key
    return newest[2] if newest is not None else None


def _agree(ok: bool, fingerprint: int) -> bool:
    """True when the candidate is usable on every worker (a collective: every rank calls it)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return ok
    device = torch.device("cpu")
    if torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    flags = torch.tensor([0 if ok else 1, fingerprint, -fingerprint], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    if int(flags[1]) != -int(flags[2]):
        raise RuntimeError("the workers see different checkpoint folders in the run's storage; "
                           "cannot agree on one to resume from")
    return int(flags[0]) == 0


def _fingerprint(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "big")


def restore_newest_intact(load: Callable[[Path], T], *, state_file: str) -> tuple[T, Candidate] | None:
    """``load(folder)`` on the newest intact checkpoint of the run; None when it has none at all.

    Must be called by every worker (the choice is agreed on collectively). Raises
    ``DamagedCheckpointError`` when there are checkpoints but none is intact.
    """
    candidates = find_candidates(state_file)
    _agree(True, _fingerprint("\n".join(c.name for c in candidates)))  # the same list on every worker
    if not candidates:
        return None
    skipped: list[str] = []
    for candidate in candidates:
        problem = candidate.problem
        with contextlib.ExitStack() as stack:
            folder = None
            if problem is None:
                try:
                    folder = Path(stack.enter_context(candidate.checkpoint.as_directory()))
                    verify_checkpoint(folder, label=candidate.label)
                except CheckpointError as exc:
                    problem = str(exc)
                except Exception as exc:  # a failed download: every rank must still reach _agree
                    problem = f"cannot read it ({type(exc).__name__}: {exc})"
            if _agree(problem is None, _fingerprint(candidate.name)) and folder is not None:
                return load(folder), candidate
        problem = problem or "another worker found it damaged"
        log.warning("skipping checkpoint %s: %s", candidate.label, problem)
        skipped.append(f"{candidate.label}: {problem}")
    raise DamagedCheckpointError(
        "no intact checkpoint to resume from; skipped:\n  " + "\n  ".join(skipped)
        + "\nmove the damaged ones away, or start over under a new run_name",
        path=candidates[0].label,
    )
