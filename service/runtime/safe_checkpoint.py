"""Reading checkpoints without executing code, and knowing they are whole.

Self-contained (torch and the standard library; DeepSpeed only to name its types), so that it
can sit under whichever package owns checkpoints.

Safe loading. ``torch.load(weights_only=False)`` runs whatever a pickle asks for: a file whose
object's ``__reduce__`` returns ``(os.system, ('...',))`` executes that command while loading.
Every checkpoint read goes through ``torch.load(weights_only=True)`` instead, whose unpickler
builds only tensors, plain containers and primitives, plus the globals on an explicit
allow-list: ``DEEPSPEED_SAFE_GLOBALS``, the types DeepSpeed itself writes into its
``*_model_states.pt`` / ``*_optim_states.pt`` files. A file needing anything else is refused
with an ``UnsafeCheckpointError`` naming the file and the global.

- ``safe_load``: one file.
- ``weights_only_loads``: a context in which every ``torch.load`` of the process, DeepSpeed's
  own (``engine.load_checkpoint``, ``zero_to_fp32``) included, is forced to weights-only with
  the allow-list (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``; explicit ``weights_only=False`` is
  overridden).
- ``check_loadable``: every torch file of a folder through the restricted unpickler (memory
  mapped, so tensors are not read), before anything else loads from it; refusals name the file.

Integrity. A checkpoint folder is written by several workers, each uploading its own files
into one folder on storage (Ray Train merges them), so each worker writes a manifest of the
files it wrote, ``checksums/rank_RRRRR.json`` (size and sha256 of each, the world size), last,
after all its files. ``verify_manifests`` says a folder is intact only when the manifests of
all ranks are there and every file they list has its size and checksum, and no file is there
that none lists; otherwise it raises ``DamagedCheckpointError`` naming what is wrong.
``verify_checkpoint`` does both checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
import threading
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Union

import torch

log = logging.getLogger(__name__)

FileSource = Union[str, os.PathLike, IO[bytes]]

MANIFEST_DIR = "checksums"
MANIFEST_FORMAT = 1
# Files torch.load may be pointed at: DeepSpeed globs *.pt; .pth/.bin/.ckpt/.pkl by convention.
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"
_CHUNK = 8 << 20


class CheckpointError(ValueError):
    """A checkpoint that is not loaded; the message names the file or folder and why."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class UnsafeCheckpointError(CheckpointError):
    """A file whose unpickling needs a global outside the allow-list (it could run code)."""

    def __init__(self, message: str, *, path: str | None = None, globals_: Iterable[str] = ()) -> None:
        super().__init__(message, path=path)
        self.globals = list(globals_)


class DamagedCheckpointError(CheckpointError):
    """A checkpoint folder that is incomplete or damaged: no manifest, missing or changed files."""


# ---------------------------------------------------------------- the allow-list


def deepspeed_safe_globals() -> list[Any]:
    """The non-torch types DeepSpeed (0.19.x) pickles into its checkpoint files.

    Found by saving real checkpoints (ZeRO 0-3, see tests/service/test_safe_checkpoint.py) and
    listing them with ``torch.serialization.get_unsafe_globals_in_checkpoint``, and by reading
    what the ZeRO optimizers put into their ``state_dict``:

    - ``ZeroStageEnum``: ``optimizer_state_dict['zero_stage']`` of ZeRO-1/2/3 optimizer shards.
    - ``LossScaler``: ``optimizer_state_dict['loss_scaler']`` of ZeRO-1/2/3 shards (a static
      scaler, scale 1, for fp32 and bf16).
    - ``DynamicLossScaler``: the same entry when training in fp16 with dynamic loss scaling.
    - ``fragment_address``: ``optimizer_state_dict['param_slice_mappings']`` of ZeRO-1/2 (and
      bf16) shards, a (numel, start) dataclass per parameter.

    Model-state files hold only tensors, ``torch.Size`` and plain containers. Each of these
    types is rebuilt by setting plain attributes (or, for the enum, from its value): none runs
    code of the file's choosing. Empty when DeepSpeed is not installed (then no file needing
    them can be loaded, which is what a checkpoint without DeepSpeed needs anyway).
    """
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _global_name(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def allowed_global_names(extra_globals: Iterable[Any] = ()) -> list[str]:
    """Names of the globals allowed beyond torch's own weights-only set."""
    return sorted({_global_name(g) for g in (*deepspeed_safe_globals(), *extra_globals)})


_GLOBALS_LOCK = threading.RLock()


@contextlib.contextmanager
def _allowed(extra_globals: Iterable[Any] = ()) -> Iterator[None]:
    # torch's safe-globals set is process-wide, and its own context removes on exit what it
    # added even when an enclosing context added it too. So: one thread at a time, and on exit
    # the set is put back exactly as it was on entry (nested contexts unwind as a stack).
    with _GLOBALS_LOCK:
        before = torch.serialization.get_safe_globals()
        torch.serialization.add_safe_globals([*deepspeed_safe_globals(), *extra_globals])
        try:
            yield
        finally:
            torch.serialization.clear_safe_globals()
            torch.serialization.add_safe_globals(before)


# ---------------------------------------------------------------- loading


def _label(src: FileSource, name: str | None) -> str:
    if name:
        return name
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return getattr(src, "name", None) or "<stream>"


def _offending_globals(src: FileSource, exc: BaseException) -> list[str]:
    """The disallowed globals of a refused file (static scan where possible, else the message)."""
    found: list[str] = []
    try:
        if not isinstance(src, (str, os.PathLike)):
            src.seek(0)
        found = list(torch.serialization.get_unsafe_globals_in_checkpoint(src))
    except Exception:  # not a zip checkpoint, or a stream without seek
        pass
    if not found:
        found = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    return sorted(set(found))


def _refusal(label: str, src: FileSource, exc: BaseException) -> UnsafeCheckpointError:
    names = _offending_globals(src, exc)
    what = f"it needs {', '.join(names)}" if names else f"its pickle is not weights-only ({str(exc).splitlines()[0]})"
    return UnsafeCheckpointError(
        f"refusing to load checkpoint file {label}: {what}, which is not on the allow-list of checkpoint "
        "types (loading never executes code from a file); if the file is yours and trusted, re-save it "
        "with tensors and plain containers only",
        path=label, globals_=names,
    )


def safe_load(src: FileSource, *, map_location: Any = "cpu", mmap: bool = False,
              extra_globals: Iterable[Any] = (), name: str | None = None) -> Any:
    """``torch.load(weights_only=True)`` with DeepSpeed's types allowed (plus ``extra_globals``).

    Raises ``UnsafeCheckpointError`` (a file needing any other global) or
    ``DamagedCheckpointError`` (not a readable torch file: truncated, garbled), naming ``name``
    (default: the path) in the message.
    """
    label = _label(src, name)
    with _allowed(extra_globals):
        try:
            return torch.load(src, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            raise _refusal(label, src, exc) from None
        except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise DamagedCheckpointError(f"checkpoint file {label} is damaged or not a torch file: "
                                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                                         path=label) from None


_FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def weights_only_loads(extra_globals: Iterable[Any] = ()) -> Iterator[None]:
    """Every ``torch.load`` inside, whatever its arguments, is weights-only with the allow-list.

    For code that calls ``torch.load(weights_only=False)`` itself (DeepSpeed's
    ``engine.load_checkpoint`` and ``zero_to_fp32``). A file needing a disallowed global raises
    ``UnsafeCheckpointError`` (run ``check_loadable`` first to have it name the file).
    """
    with _GLOBALS_LOCK:
        saved = {k: os.environ.get(k) for k in (_FORCE_ENV, _FORCE_NO_ENV)}
        os.environ[_FORCE_ENV] = "1"
        os.environ.pop(_FORCE_NO_ENV, None)
        try:
            with _allowed(extra_globals):
                try:
                    yield
                except pickle.UnpicklingError as exc:
                    names = re.findall(r"GLOBAL ([\w.]+)", str(exc))
                    raise UnsafeCheckpointError(
                        f"refusing to load a checkpoint file: it needs {', '.join(names) or 'a disallowed global'}, "
                        "which is not on the allow-list of checkpoint types (loading never executes code)",
                        globals_=names,
                    ) from None
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _looks_pickled(path: Path) -> bool:
    if path.suffix in TORCH_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO)


def torch_files(folder: str | os.PathLike) -> list[Path]:
    """The files of ``folder`` (recursively) that a loader could hand to ``torch.load``."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.is_file() and _looks_pickled(p))


def check_loadable(folder: str | os.PathLike, *, label: str | None = None,
                   extra_globals: Iterable[Any] = ()) -> list[Path]:
    """Runs every torch file of ``folder`` through the restricted unpickler (tensors memory
    mapped, not read). Raises ``UnsafeCheckpointError`` / ``DamagedCheckpointError`` naming the
    first bad file as ``label/relative/path``; returns the files checked."""
    root = Path(folder)
    files = torch_files(root)
    for path in files:
        rel = path.relative_to(root).as_posix()
        name = f"{label.rstrip('/')}/{rel}" if label else str(path)
        mmap = zipfile.is_zipfile(path)  # the legacy (non-zip) format cannot be mapped
        safe_load(path, map_location="cpu", mmap=mmap, extra_globals=extra_globals, name=name)
    return files


# ---------------------------------------------------------------- manifests


def manifest_name(rank: int) -> str:
    return f"{MANIFEST_DIR}/rank_{rank:05d}.json"


def _digest(path: Path) -> tuple[str, int]:
    sha = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def _content_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != MANIFEST_DIR)


def write_manifest(folder: str | os.PathLike, *, rank: int = 0, world_size: int = 1) -> Path:
    """Writes ``checksums/rank_RRRRR.json`` over every file now in ``folder``; call it last."""
    root = Path(folder)
    files = {}
    for path in _content_files(root):
        sha, size = _digest(path)
        files[path.relative_to(root).as_posix()] = {"sha256": sha, "size": size}
    out = root / manifest_name(rank)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "rank": rank, "world_size": world_size,
                               "files": files}, indent=1, sort_keys=True))
    tmp.replace(out)
    return out


def has_manifest(folder: str | os.PathLike) -> bool:
    return any((Path(folder) / MANIFEST_DIR).glob("rank_*.json"))


def verify_manifests(folder: str | os.PathLike, *, label: str | None = None) -> int:
    """Checks ``folder`` against its manifests; returns the number of files verified.

    Raises ``DamagedCheckpointError`` (naming ``label``, default the folder) when a manifest is
    missing or unreadable, a listed file is missing or differs in size or checksum, or a file
    is there that no manifest lists.
    """
    root = Path(folder)
    name = label or str(root)

    def damaged(why: str) -> DamagedCheckpointError:
        return DamagedCheckpointError(f"checkpoint {name} is damaged or incomplete: {why}", path=name)

    paths = sorted((root / MANIFEST_DIR).glob("rank_*.json"))
    if not paths:
        raise damaged(f"it has no checksums manifest ({MANIFEST_DIR}/rank_*.json): it was not completely "
                      "written, or was written by a version that did not record checksums")
    expected: dict[str, dict[str, Any]] = {}
    ranks: dict[int, int] = {}
    for path in paths:
        try:
            manifest = json.loads(path.read_text())
            rank, world, files = int(manifest["rank"]), int(manifest["world_size"]), dict(manifest["files"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise damaged(f"its manifest {path.relative_to(root).as_posix()} is unreadable ({exc})") from None
        if manifest.get("format") != MANIFEST_FORMAT:
            raise damaged(f"its manifest {path.relative_to(root).as_posix()} has unknown format "
                          f"{manifest.get('format')!r}")
        ranks[rank] = world
        for rel, entry in files.items():
            if rel in expected and expected[rel] != entry:
                raise damaged(f"ranks disagree on the contents of {rel}")
            expected[rel] = entry
    worlds = set(ranks.values())
    if len(worlds) != 1:
        raise damaged(f"its manifests disagree on the number of workers ({sorted(worlds)})")
    world = worlds.pop()
    missing_ranks = sorted(set(range(world)) - set(ranks))
    if missing_ranks:
        raise damaged(f"the manifests of rank(s) {missing_ranks} of {world} are missing")
    for rel, entry in sorted(expected.items()):
        path = root / rel
        if not path.is_file():
            raise damaged(f"{rel} is missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise damaged(f"{rel} has {size} bytes, the manifest says {entry['size']}")
        sha, _ = _digest(path)
        if sha != entry["sha256"]:
            raise damaged(f"{rel} does not match its checksum")
    extra = [p.relative_to(root).as_posix() for p in _content_files(root)]
    extra = [rel for rel in extra if rel not in expected]
    if extra:
        raise damaged(f"it holds file(s) no manifest lists: {', '.join(extra[:5])}")
    return len(expected)


def verify_checkpoint(folder: str | os.PathLike, *, label: str | None = None, require_manifest: bool = True,
                      extra_globals: Iterable[Any] = ()) -> None:
    """``verify_manifests`` (when ``require_manifest`` or the folder has a manifest; otherwise a
    warning), then ``check_loadable``. Raises a ``CheckpointError`` naming what is wrong."""
    name = label or str(folder)
    if require_manifest or has_manifest(folder):
        verify_manifests(folder, label=name)
    else:
        log.warning("checkpoint %s has no checksums manifest: its completeness cannot be verified "
                    "(its files are still loaded weights-only)", name)
    check_loadable(folder, label=name, extra_globals=extra_globals)
