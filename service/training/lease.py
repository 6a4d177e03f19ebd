"""One writer per run: a lease file in the run's own storage folder.

Two drivers writing the same run (same ``checkpoint.storage_path`` and ``run_name``) would
interleave their checkpoints, log every metric twice into one MLflow run and register the model
twice. So a driver holds a lease, ``<storage_path>/<run_name>/.convmae-lease.json``, from before
it starts Ray until it ends, successful or not:

- taking it is an exclusive create: a lease that exists and is alive refuses the second run
  with ``RunLeaseError`` (a ``ConfigError``: the job exits 2 naming the run and the holder);
- a heartbeat thread renews it every ``timeout_s / 5`` seconds;
- a lease whose holder is dead is taken over with a warning: its process is gone (same
  machine), or it was not renewed for ``timeout_s`` (any machine; renewal times are the
  holder's clock, so machines' clocks must agree to well within ``timeout_s``);
- a lease file is untrusted input: one with a malformed field (a string pid, a NaN or infinite
  time or timeout, a time further ahead of this clock than ``CLOCK_SKEW_S``) proves no holder
  alive and is taken over with a warning naming the file and the field; a folder where the file
  goes is refused (``ConfigError``);
- every change is a compare-and-swap, so two drivers racing for a stale lease cannot both win:
  S3 conditional writes (``If-None-Match`` / ``If-Match`` on the object's ETag) on object
  storage; an exclusive ``flock`` around read-check-write on a local (or NFS) folder. Other
  fsspec stores get a best-effort check-then-write.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from service.config import ConfigError, StorageConfig, redact_url

log = logging.getLogger(__name__)

LEASE_FILE = ".convmae-lease.json"
LOCK_FILE = ".convmae-lease.lock"  # local folders only: serialises read-check-write
# Files of the lease itself, which do not make a folder a run with checkpoints.
LEASE_FILES = frozenset({LEASE_FILE, LOCK_FILE})
DEFAULT_TIMEOUT_S = 300.0
# How far ahead of this machine's clock another machine's lease times may be before they are
# taken for garbage: a lease "renewed" years ahead would otherwise never expire.
CLOCK_SKEW_S = 60.0
LOCK_WAIT_S = 30.0  # the longest a local lease waits for its lock file (held for milliseconds)


class RunLeaseError(ConfigError):
    """Another live run holds the lease of this run."""


class MalformedLeaseError(ValueError):
    """A lease file that is no JSON object of ``Holder``'s fields of the right types."""


_TEXT_FIELDS = ("run_name", "host", "machine", "token")
_TIME_FIELDS = ("pid_started", "started_at", "renewed_at")


@dataclass(frozen=True)
class Holder:
    """What a lease file says about the run holding it."""

    run_name: str
    host: str  # hostname, for people
    machine: str  # hostname + boot id + pid namespace: where ``pid`` means this process
    pid: int
    pid_started: float  # the process's start time, so a reused pid is not taken for it
    started_at: float  # unix time the lease was taken
    renewed_at: float
    timeout_s: float
    token: str  # this holder, among all

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {_iso(self.started_at)}"

    def to_bytes(self) -> bytes:
        return json.dumps({**asdict(self), "started": _iso(self.started_at), "renewed": _iso(self.renewed_at)},
                          indent=1).encode()

    @staticmethod
    def from_bytes(data: bytes) -> Holder:
        """The holder a lease file names; ``MalformedLeaseError`` naming the first bad field."""
        try:
            raw = json.loads(data)
        except ValueError as exc:  # also bytes that are no UTF-8
            raise MalformedLeaseError(f"it is not JSON ({type(exc).__name__})") from None
        if not isinstance(raw, dict):
            raise MalformedLeaseError(f"it holds a JSON {type(raw).__name__}, not an object")
        for name in Holder.__dataclass_fields__:
            if name not in raw:
                raise MalformedLeaseError(f"field {name!r} is missing")
            value = raw[name]
            if name in _TEXT_FIELDS:
                ok, allowed = isinstance(value, str) and value.isprintable(), "a one-line string"
            elif name == "pid":
                ok, allowed = type(value) is int and value > 0, "a positive integer"
            else:  # times and the timeout: NaN or infinity would make the lease never expire
                ok = type(value) in (int, float) and math.isfinite(value) and (name != "timeout_s" or value > 0)
                allowed = "a positive number of seconds" if name == "timeout_s" else "a unix time"
            if not ok:
                raise MalformedLeaseError(f"field {name!r} is {value!r}; expected {allowed}")
        return Holder(**{k: raw[k] for k in Holder.__dataclass_fields__})

    def stale_because(self, now: float) -> str | None:
        """Why this holder is dead (None: it may be alive)."""
        for name in _TIME_FIELDS:
            ahead = getattr(self, name) - now
            if ahead > CLOCK_SKEW_S:  # not clock skew: garbage, or a lease that would never expire
                return (f"field {name!r} of the lease file is {ahead:.0f} s ahead of this machine's clock "
                        f"(allowed: {CLOCK_SKEW_S:.0f} s of clock skew)")
        if self.machine == this_machine() and not _process_alive(self.pid, self.pid_started):
            return f"its process {self.pid} on {self.host} is gone"
        age = now - self.renewed_at
        if age > self.timeout_s:
            return f"it was not renewed for {age:.0f} s (timeout {self.timeout_s:.0f} s)"
        return None


class RunLease:
    """The lease of run ``run_name`` under ``storage_path`` (a local folder or fsspec URL).

    ``acquire`` takes it (or raises ``RunLeaseError``) and starts the heartbeat; ``release``
    stops it and deletes the lease if it is still this one's. Also a context manager.
    """

    def __init__(self, storage_path: str, run_name: str, storage: StorageConfig | None = None, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S, what: str = "run_name"):
        self.run_name = run_name
        self.timeout_s = timeout_s
        self.what = what  # the config key naming the run, for messages
        folder = storage_path.rstrip("/") + "/" + run_name
        self.label = redact_url(folder + "/" + LEASE_FILE)
        self._store = _store_for(folder, storage)
        self._holder: Holder | None = None
        self._version: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._lock = threading.Lock()  # heartbeat vs release

    @property
    def held(self) -> bool:
        return self._holder is not None

    def acquire(self) -> RunLease:
        now = time.time()
        me = Holder(run_name=self.run_name, host=socket.gethostname(), machine=this_machine(), pid=os.getpid(),
                    pid_started=_process_start(os.getpid()), started_at=now, renewed_at=now,
                    timeout_s=self.timeout_s, token=uuid.uuid4().hex)
        for _ in range(5):  # each round loses only to another driver that changed the lease meanwhile
            try:
                version = self._store.create(me.to_bytes())
                found = None if version is not None else self._store.read()
            except IsADirectoryError:
                raise ConfigError(f"{self.label} is a folder, not a lease file: it is where the lease of "
                                  f"{self.what}={self.run_name!r} goes; move that folder away") from None
            if version is not None:
                break
            if found is None:
                continue  # released in between: create again
            data, found_version = found
            holder: Holder | None
            try:
                holder, reason = Holder.from_bytes(data), None
            except MalformedLeaseError as exc:
                # A crash mid-write of a store without atomic writes, or not our file: it proves
                # no holder alive.
                holder, reason = None, f"the lease file is malformed: {exc}"
            if holder is not None:
                reason = holder.stale_because(time.time())
            if reason is None:
                assert holder is not None
                raise RunLeaseError(
                    f"{self.what}={self.run_name!r} is in use by another run ({holder.describe()}, renewed "
                    f"{max(0.0, time.time() - holder.renewed_at):.0f} s ago); wait for it to end or choose another "
                    f"{self.what}. If that run is gone, its lease {self.label} is taken over once not renewed "
                    f"for {holder.timeout_s:.0f} s, or delete that file"
                )
            version = self._store.replace(me.to_bytes(), found_version)
            if version is not None:
                log.warning("%s=%r: taking over the lease of a dead run (%s): %s; lease file %s", self.what,
                            self.run_name, holder.describe() if holder else "unknown holder", reason, self.label)
                break
        else:
            raise RunLeaseError(f"{self.what}={self.run_name!r}: could not take the lease {self.label}: "
                                "other runs keep changing it")
        self._holder, self._version = me, version
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._renew_until_stopped, name=f"lease-{self.run_name}",
                                           daemon=True)
        self._heartbeat.start()
        log.info("holding the lease %s (%s)", self.label, me.describe())
        return self

    def release(self) -> None:
        """Stops renewing and deletes the lease if it is still this one's; never raises (it runs
        while a failed run unwinds)."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=60)
            self._heartbeat = None
        with self._lock:
            if self._holder is None or self._version is None:
                return
            try:
                self._store.delete(self._version)
            except Exception as exc:
                log.warning("could not release the lease %s (%s: %s); it lapses after %.0f s", self.label,
                            type(exc).__name__, exc, self.timeout_s)
            self._holder = self._version = None

    def renew(self) -> bool:
        """Writes a fresh renewal time; False when the lease is no longer this one's."""
        with self._lock:
            if self._holder is None or self._version is None:
                return False
            renewed = Holder(**{**asdict(self._holder), "renewed_at": time.time()})
            version = self._store.replace(renewed.to_bytes(), self._version)
            if version is None:
                log.error("%s=%r: lost the lease %s to another run, which now writes the same run; "
                          "stop one of them", self.what, self.run_name, self.label)
                self._holder = self._version = None
                return False
            self._holder, self._version = renewed, version
            return True

    def _renew_until_stopped(self) -> None:
        failing = False
        while not self._stop.wait(self.timeout_s / 5):
            try:
                if not self.renew():
                    return
                failing = False
            except Exception as exc:  # a storage hiccup: the next beat tries again
                if not failing:
                    log.warning("could not renew the lease %s (%s: %s); retrying", self.label,
                                type(exc).__name__, exc)
                failing = True

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------- the stores


class _Store(Protocol):
    """One small file with compare-and-swap; a version names one written content."""

    def create(self, data: bytes) -> str | None: ...  # None: the file exists

    def read(self) -> tuple[bytes, str] | None: ...  # None: no file

    def replace(self, data: bytes, version: str) -> str | None: ...  # None: not at ``version`` any more

    def delete(self, version: str) -> None: ...  # only if still at ``version``


def _store_for(folder: str, storage: StorageConfig | None) -> _Store:
    from service.data.storage import S3_PROTOCOLS, filesystem, protocol_of, storage_options

    protocol = protocol_of(folder)
    if protocol in ("file", "local"):
        return _LocalStore(Path(folder.removeprefix("file://")).resolve())
    fs, path = filesystem(folder, storage_options(storage))
    if protocol in S3_PROTOCOLS:
        return _S3Store(fs, path + "/" + LEASE_FILE)
    return _FsspecStore(fs, path + "/" + LEASE_FILE)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _LocalStore:
    """A lease file in a local (or NFS) folder; an exclusive ``flock`` on a lock file beside it
    makes each read-check-write atomic among processes, and writes are renames."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / LEASE_FILE

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Holds the lock for one read-check-write (milliseconds). A lock held far longer is a
        stuck holder or a stuck NFS lock server: waiting for it has a deadline, like every wait."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise RunLeaseError(f"could not lock {self.folder / LOCK_FILE} within {LOCK_WAIT_S:g} s: "
                                            "another process holds it; if none should, delete that file") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def _current(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def _write(self, data: bytes) -> str:
        tmp = self.path.with_name(f"{LEASE_FILE}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # readers without the lock never see half a file
        return _digest(data)

    def create(self, data: bytes) -> str | None:
        with self._locked():
            return None if self._current() is not None else self._write(data)

    def read(self) -> tuple[bytes, str] | None:
        data = self._current()
        return None if data is None else (data, _digest(data))

    def replace(self, data: bytes, version: str) -> str | None:
        with self._locked():
            current = self._current()
            return None if current is None or _digest(current) != version else self._write(data)

    def delete(self, version: str) -> None:
        with self._locked():
            current = self._current()
            if current is not None and _digest(current) == version:
                self.path.unlink()


class _S3Store:
    """A lease object written with S3 conditional writes: ``If-None-Match: *`` to create,
    ``If-Match: <ETag>`` to replace (AWS S3, MinIO and others that implement them)."""

    def __init__(self, fs: Any, path: str):
        self.fs, self.path = fs, path

    def _etag(self) -> str:
        self.fs.invalidate_cache(self.path)
        return self.fs.info(self.path)["ETag"]

    def create(self, data: bytes) -> str | None:
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except Exception as exc:
            if _precondition_failed(exc):
                return None
            raise
        return self._etag()  # a replace with a newer ETag than ours fails: safe

    def read(self) -> tuple[bytes, str] | None:
        try:
            etag = self._etag()  # before the content: a change in between makes the ETag stale, not wrong
            return self.fs.cat_file(self.path), etag
        except FileNotFoundError:
            return None

    def replace(self, data: bytes, version: str) -> str | None:
        try:
            self.fs.pipe_file(self.path, data, IfMatch=version)
        except FileNotFoundError:
            return None
        except Exception as exc:
            if _precondition_failed(exc):
                return None
            raise
        return self._etag()

    def delete(self, version: str) -> None:
        # S3 has no conditional delete on general-purpose buckets; the check narrows the window
        # to one request, and a live lease is never taken over anyway.
        try:
            if self._etag() == version:
                self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass


def _precondition_failed(exc: BaseException) -> bool:
    """Whether s3fs's error is a failed ``If-None-Match`` / ``If-Match`` (or AWS's 409 for two
    conditional writes at once)."""
    if isinstance(exc, FileExistsError):
        return True
    response = getattr(exc.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict")


class _FsspecStore:
    """Any other fsspec store: check, then write (not atomic; a race between two drivers
    starting within the same moment can let both through)."""

    def __init__(self, fs: Any, path: str):
        self.fs, self.path = fs, path

    def create(self, data: bytes) -> str | None:
        if self.read() is not None:
            return None
        self.fs.pipe_file(self.path, data)
        return _digest(data)

    def read(self) -> tuple[bytes, str] | None:
        self.fs.invalidate_cache(self.path)
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, _digest(data)

    def replace(self, data: bytes, version: str) -> str | None:
        found = self.read()
        if found is None or found[1] != version:
            return None
        self.fs.pipe_file(self.path, data)
        return _digest(data)

    def delete(self, version: str) -> None:
        found = self.read()
        if found is not None and found[1] == version:
            self.fs.rm_file(self.path)


# ---------------------------------------------------------------- processes and machines


def this_machine() -> str:
    """Hostname, boot and pid namespace: two holders with the same value can check each other's
    pid (containers share a kernel, and often a hostname, but not their pids)."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "|".join(parts)


def _process_start(pid: int) -> float:
    import psutil

    return psutil.Process(pid).create_time()


def _process_alive(pid: int, started: float) -> bool:
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # exists but cannot be inspected (another user's): assume alive
        return True


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")
