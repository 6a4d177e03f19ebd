"""Scratch folders in the system temp directory that do not outlive their process.

A checkpoint is written to local disk before it is uploaded (1.7 GB for convmae_base), a model
is downloaded before it is loaded: each in a ``convmae-<kind>-<pid>-<host>-*`` folder under
``tempfile.gettempdir()``. ``scratch`` removes its folder when the block ends, on any exception
and on KeyboardInterrupt too. A process killed outright (SIGKILL, the OOM killer, a worker Ray
tears down) runs no cleanup, so ``sweep_stale_scratch`` — called as jobs and workers start —
removes the scratch folders whose owner, named in the folder, is no longer running on this
machine. Folders of live processes, and of other machines sharing the temp directory, stay.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SCRATCH_PREFIX = "convmae-"
_OWNED = re.compile(r"^convmae-[a-z]+-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-")


def _host_tag() -> str:
    # Process ids mean something on one machine only (a temp dir may be shared between hosts).
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def scratch_dir(kind: str, *, root: str | os.PathLike | None = None) -> Path:
    """A new ``convmae-<kind>-<pid>-<host>-*`` folder in ``root`` (default: the system temp
    directory) that the caller removes; a sweep removes it once this process is gone."""
    if not re.fullmatch(r"[a-z]+", kind):
        raise ValueError(f"scratch kind {kind!r} is not allowed: lowercase letters only")
    return Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{kind}-{os.getpid()}-{_host_tag()}-", dir=root))


@contextlib.contextmanager
def scratch(kind: str, *, root: str | os.PathLike | None = None) -> Iterator[Path]:
    """``scratch_dir(kind)`` for the duration of the block; removed however the block ends."""
    folder = scratch_dir(kind, root=root)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale_scratch(root: str | os.PathLike | None = None) -> list[Path]:
    """Removes the scratch folders in ``root`` (default: the system temp directory) left by
    processes of this machine that are no longer running; returns them. Never fails."""
    base = Path(root or tempfile.gettempdir())
    host = _host_tag()
    removed = []
    try:
        entries = list(base.iterdir())
    except OSError:
        return removed
    for entry in entries:
        owner = _OWNED.match(entry.name)
        if owner is None or owner["host"] != host or _running(int(owner["pid"])):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
                removed.append(entry)
    if removed:
        log.info("removed %d scratch folder(s) left by stopped processes in %s: %s", len(removed), base,
                 ", ".join(p.name for p in removed[:5]))
    return removed
