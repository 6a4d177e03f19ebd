"""Resuming a Ray Train run from its newest intact checkpoint.

Everything on storage is untrusted input here: what cannot be read, or points outside the run's
folder, counts as absent, and a checkpoint that fails to load gives way to the one before it.

``ray.train.get_checkpoint()`` hands a worker the latest checkpoint that Ray Train's controller
*registered*. That is not always the newest one on storage, nor always a usable one:

- A worker uploads its checkpoint folder (``checkpoint_<timestamp>`` under
  ``storage_path/run_name``) during ``ray.train.report``; the controller registers it, and
  records it in ``checkpoint_manager_snapshot.json``, only when it next polls the workers. A run
  stopped in between (Ctrl-C, a killed driver) leaves the newest folder on storage but not in the
  snapshot, so the rerun resumed from the one before and the newest was orphaned.
- The newest folder can be damaged or incomplete (a cut-off upload, a truncated file), hold
  a file that would execute code when unpickled, or hold well-formed files of the wrong content
  (missing weights, wrong shapes, an RNG state of another type).
- The snapshot itself can be damaged (a full disk leaves it empty: Ray Train then refuses to
  start the run at all), or name a folder outside the run (``../../elsewhere``, an absolute
  path), which Ray Train would hand the workers as the run's checkpoint.

So the driver first checks Ray's snapshot (``set_aside_unusable_snapshot``): one that is not
JSON of the shape Ray Train reads, or names a checkpoint outside the run's folder or no longer
there (as after moving a damaged one away), is renamed ``checkpoint_manager_snapshot.json.corrupt-<time>``
with a warning, and Ray Train starts with an empty registry. Then a resuming worker lists every
``checkpoint_*`` folder of the run (plus Ray's own pick; anything resolving outside the run's
folder is refused with a warning), orders them by the training position each recorded
(``train_state.json``: optimizer step, micro step, epoch; then by folder name, which is a
timestamp), and takes the newest whose manifests verify, whose files all pass the weights-only
allow-list (``service.runtime.safe_checkpoint``), whose content the caller's ``check`` accepts
and whose ``load`` succeeds. Every skipped folder is named in a warning with the reason. All
workers agree on each candidate, after checking and again after loading it, so they resume from
the same one. When checkpoints exist but none loads, it raises a ``DamagedCheckpointError``
naming each, rather than silently starting over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import time
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
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's registry of a run's checkpoints


@dataclass(frozen=True)
class RunStorage:
    """A run's folder of checkpoints (Ray Train's experiment folder) in a pyarrow filesystem."""

    fs: Any  # pyarrow.fs.FileSystem
    folder: str

    @classmethod
    def of_this_worker(cls) -> RunStorage:
        import ray.train

        storage = ray.train.get_context().get_storage()  # a Ray DeveloperAPI: the run's StorageContext
        return cls(storage.storage_filesystem, storage.experiment_fs_path)

    @property
    def is_local(self) -> bool:
        return getattr(self.fs, "type_name", "") == "local"

    def contains(self, path: str) -> bool:
        """True when ``path`` lies inside the run's folder once ``..`` and, on local disk,
        symbolic links are resolved."""
        if self.is_local:
            root, target = os.path.realpath(self.folder), os.path.realpath(path)
        else:
            root, target = posixpath.normpath(self.folder), posixpath.normpath(path)
        return target != root and target.startswith(root.rstrip("/") + "/")


@dataclass
class Candidate:
    checkpoint: Any  # ray.train.Checkpoint
    name: str  # its folder name
    position: tuple[int, int, int] | None  # (optimizer_step, micro_step, epoch) from its train state
    problem: str | None = None  # why it cannot be used, found before downloading it

    @property
    def label(self) -> str:
        """The folder as users know it: a local path, or a URL for object storage."""
        return _label(str(self.checkpoint.path), self.checkpoint.filesystem)


def _label(path: str, fs: Any) -> str:
    kind = getattr(fs, "type_name", "local")
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
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, f"its {state_file} is unreadable ({type(exc).__name__}: {exc})"


def _refuse_outside(storage: RunStorage, path: str, named_by: str) -> None:
    log.warning("refusing checkpoint %s (%s): it is outside the run's folder %s; treating it as absent",
                _label(path, storage.fs), named_by, _label(storage.folder, storage.fs))


def _stored_checkpoint_paths(storage: RunStorage) -> list[str]:
    """Every ``checkpoint_*`` folder inside the run's folder (one linking outside is refused)."""
    import pyarrow.fs

    infos = storage.fs.get_file_info(pyarrow.fs.FileSelector(storage.folder, allow_not_found=True, recursive=False))
    paths = []
    for info in infos:
        if info.type != pyarrow.fs.FileType.Directory or not info.base_name.startswith(CHECKPOINT_PREFIX):
            continue
        if storage.contains(info.path):
            paths.append(info.path)
        else:
            _refuse_outside(storage, info.path, "a link in the run's folder")
    return paths


def find_candidates(state_file: str, storage: RunStorage | None = None, reported: Any = None) -> list[Candidate]:
    """Ray's latest checkpoint and every checkpoint folder of the run, newest position first;
    any of them outside the run's folder is left out with a warning.

    ``storage``/``reported`` (Ray's pick, a ``ray.train.Checkpoint`` or None): default, those of
    the Ray Train worker calling it.
    """
    from ray.train import Checkpoint

    if storage is None:
        import ray.train

        storage, reported = RunStorage.of_this_worker(), ray.train.get_checkpoint()
    found: dict[str, Any] = {}
    if reported is not None:
        if storage.contains(str(reported.path)):
            found[str(reported.path).rstrip("/")] = reported
        else:
            _refuse_outside(storage, str(reported.path), f"named by Ray Train's {RAY_SNAPSHOT}")
    try:
        for path in _stored_checkpoint_paths(storage):
            found.setdefault(path.rstrip("/"), Checkpoint(path=path, filesystem=storage.fs))
    except Exception as exc:  # storage not listable: Ray's pick alone
        log.warning("cannot list the run's checkpoints (%s: %s); considering only %s", type(exc).__name__, exc,
                    ", ".join(found) or "none")
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
    newest: tuple[tuple[int, int, int], str, dict[str, Any]] | None = None
    for path in _stored_checkpoint_paths(RunStorage(fs, run_folder)):
        try:
            with fs.open_input_stream(f"{path}/{state_file}") as f:
                state = json.loads(f.read().decode("utf-8"))
            key = (_position(state), path.rsplit("/", 1)[-1], state)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # incomplete or damaged: the workers skip it too
        if newest is None or key[:2] > newest[:2]:
            newest = key
    return newest[2] if newest is not None else None


# ---------------------------------------------------------------- Ray Train's run snapshot


class _Unusable(ValueError):
    """Why a run snapshot cannot be used."""


def _result_name(result: Any, where: str) -> str:
    if not isinstance(result, dict) or not isinstance(result.get("checkpoint_dir_name"), str) \
            or not isinstance(result.get("metrics"), dict):
        raise _Unusable(f"{where} is not a checkpoint result (an object with a checkpoint_dir_name and metrics)")
    return result["checkpoint_dir_name"]


def _list_of(snapshot: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> list[Any]:
    value = snapshot.get(key)
    if not isinstance(value, list) or not all(isinstance(v, kind) and not (kind is int and isinstance(v, bool))
                                              for v in value):
        raise _Unusable(f"its {key} is not a list of {getattr(kind, '__name__', 'values')}")
    return value


def _ray_parses(snapshot: dict[str, Any]) -> None:
    """Raises ``_Unusable`` when the installed Ray Train's own model of the snapshot refuses it.

    ``_CheckpointManagerState`` is Ray's internal: when a Ray version lacks it, the checks of
    ``_check_snapshot`` (the fields Ray 2.x reads) stand alone."""
    try:
        from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
            _CheckpointManagerState,
        )
    except ImportError:
        return
    try:
        validate = getattr(_CheckpointManagerState, "model_validate", None) or _CheckpointManagerState.parse_obj
        validate(snapshot)  # pydantic 2, else 1
    except Exception as exc:
        version = snapshot.get("ray_version")
        written = f" (it was written by Ray {version})" if isinstance(version, str) else ""
        raise _Unusable(f"Ray Train cannot read it{written}: {_failure(exc)}") from None


def _check_snapshot(snapshot: Any, storage: RunStorage) -> None:
    """Raises ``_Unusable`` unless ``snapshot`` is what Ray Train loads: the fields of its
    ``_CheckpointManagerState``, every checkpoint it names inside the run's folder and there."""
    if not isinstance(snapshot, dict):
        raise _Unusable(f"it holds a JSON {type(snapshot).__name__}, not an object")
    results = [_result_name(r, f"checkpoint_results[{i}]")
               for i, r in enumerate(_list_of(snapshot, "checkpoint_results", dict))]
    if len(_list_of(snapshot, "checkpoint_report_indices", int)) != len(results):
        raise _Unusable("its checkpoint_report_indices and checkpoint_results differ in length")
    named = list(results)
    if snapshot.get("latest_checkpoint_result") is not None:
        named.append(_result_name(snapshot["latest_checkpoint_result"], "latest_checkpoint_result"))
    pending = [_result_name(r, f"pending_training_results[{i}]")
               for i, r in enumerate(_list_of(snapshot, "pending_training_results", dict))]
    if len(_list_of(snapshot, "pending_validation_specs", (bool, dict))) != len(pending):
        raise _Unusable("its pending_validation_specs and pending_training_results differ in length")
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        _list_of(snapshot, key, str)
    index = snapshot.get("current_report_index")
    if not isinstance(index, int) or isinstance(index, bool):
        raise _Unusable("its current_report_index is not a whole number")
    for name in dict.fromkeys(named + pending):
        if name not in results:  # Ray looks each one up among checkpoint_results
            raise _Unusable(f"it names checkpoint {name!r} outside its checkpoint_results")
        path = posixpath.join(storage.folder, name)  # how Ray Train builds the checkpoint's path
        if not storage.contains(path):
            raise _Unusable(f"it names checkpoint {name!r}, which is outside the run's folder "
                            f"({_label(path, storage.fs)})")
    import pyarrow.fs

    for name in results:
        if storage.fs.get_file_info(posixpath.join(storage.folder, name)).type != pyarrow.fs.FileType.Directory:
            raise _Unusable(f"it names checkpoint {name!r}, which is not there")
    _ray_parses(snapshot)


def snapshot_problem(storage: RunStorage) -> str | None:
    """Why Ray Train's snapshot of the run cannot be used; None when it can, or there is none."""
    import pyarrow.fs

    path = f"{storage.folder}/{RAY_SNAPSHOT}"
    try:
        if storage.fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
            return None
        with storage.fs.open_input_stream(path) as f:
            raw = f.read()
    except OSError as exc:
        return f"it is unreadable ({type(exc).__name__}: {exc})"
    if not raw.strip():
        return f"it is empty ({len(raw)} bytes)"
    try:
        _check_snapshot(json.loads(raw.decode("utf-8")), storage)
    except (UnicodeDecodeError, ValueError) as exc:  # _Unusable is a ValueError
        return str(exc) if isinstance(exc, _Unusable) else f"it is not JSON ({type(exc).__name__}: {exc})"
    return None


def set_aside_unusable_snapshot(storage: RunStorage) -> str | None:
    """For drivers, before Ray Train opens the run: renames Ray Train's snapshot of the run
    (``checkpoint_manager_snapshot.json``) to ``...corrupt-<time>`` when it cannot be used, with a
    warning, so that Ray Train starts and the workers find the run's checkpoints in its folder;
    returns why it was set aside (None: it was fine, or there was none)."""
    problem = snapshot_problem(storage)
    if problem is None:
        return None
    path = f"{storage.folder}/{RAY_SNAPSHOT}"
    aside = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        storage.fs.move(path, aside)
    except OSError:
        storage.fs.delete_file(path)  # cannot be renamed: removing it is the other way to start
        aside = "removed"
    log.warning("Ray Train's run snapshot %s cannot be used: %s; set aside (%s): resuming from the "
                "checkpoints found in the run's folder instead", _label(path, storage.fs), problem,
                _label(aside, storage.fs) if aside != "removed" else aside)
    return problem


# ---------------------------------------------------------------- restoring


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


def _failure(exc: Exception) -> str:
    if isinstance(exc, CheckpointError):
        return str(exc)
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


def restore_newest_intact(load: Callable[[Path], T], *, state_file: str,
                          check: Callable[[Path], None] | None = None, storage: RunStorage | None = None,
                          reported: Any = None) -> tuple[T, Candidate] | None:
    """``load(folder)`` on the newest checkpoint of the run that is intact, passes ``check(folder)``
    (which raises when its content does not fit) and loads; None when the run has none at all.
    A candidate failing any of these is skipped with a warning naming it and why, for the next
    older one. ``storage``/``reported``: as for ``find_candidates``.

    Must be called by every worker (the choice is agreed on collectively; ``load`` runs only on
    candidates every worker checked). Raises ``DamagedCheckpointError`` when there are
    checkpoints but none loads.
    """
    candidates = find_candidates(state_file, storage, reported)
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
                    if check is not None:
                        check(folder)
                except CheckpointError as exc:
                    problem = str(exc)
                except Exception as exc:  # a failed download or a bad file: every rank must still reach _agree
                    problem = f"cannot read it ({_failure(exc)})"
            if _agree(problem is None, _fingerprint(candidate.name)) and folder is not None:
                try:
                    loaded = load(folder)
                except Exception as exc:  # what check could not foresee; the next one is loaded over it
                    problem = f"it does not load ({_failure(exc)})"
                if _agree(problem is None, _fingerprint(f"{candidate.name} loaded")):
                    return loaded, candidate
        problem = problem or "another worker could not use it"
        log.warning("skipping checkpoint %s: %s", candidate.label, problem)
        skipped.append(f"{candidate.label}: {problem}")
    raise DamagedCheckpointError(
        "no intact checkpoint to resume from; skipped:\n  " + "\n  ".join(skipped)
        + "\nmove the damaged ones away, or start over under a new run_name",
        path=candidates[0].label,
    )
