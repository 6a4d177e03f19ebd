"""Filesystem access: s3fs options from config and environment, per-process filesystems, retries.

Credentials come from the standard AWS_* environment variables (or botocore's own chain when
those are unset) and live only in a :class:`StorageOptions` dict, whose repr masks them, so a
logged config or error never shows a secret.
"""

from __future__ import annotations

import copy
import logging
import os
import posixpath
import random
import tarfile
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from service.config import StorageConfig, redact_url
from service.data.errors import DataError

log = logging.getLogger(__name__)

T = TypeVar("T")

_SECRET_KEYS = frozenset({"key", "secret", "token", "password", "aws_secret_access_key",
                          "aws_session_token", "aws_access_key_id"})
# Protocols that get the S3 options; any other remote protocol reads its own environment.
S3_PROTOCOLS = ("s3", "s3a")
# Remote files are read in large blocks with the next block fetched in the background, so a
# worker decodes one block while the next is in flight.
REMOTE_BLOCK_BYTES = 8 * 2**20


class StorageOptions(dict):
    """s3fs keyword arguments; repr and str mask credentials so logging this is harmless."""

    def __repr__(self) -> str:
        return repr(_masked(self))

    __str__ = __repr__


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("***" if k in _SECRET_KEYS and v else _masked(v)) for k, v in value.items()}
    return value


def storage_options(cfg: StorageConfig | None = None) -> StorageOptions:
    """s3fs kwargs from ``cfg`` (the ``storage`` config section), falling back to the standard AWS environment variables.

    endpoint: cfg.endpoint_url, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL (MinIO, Ceph,
    moto...). Region: cfg.region, else AWS_REGION, else AWS_DEFAULT_REGION. Credentials:
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN) when both are set, else left
    to botocore's chain (profile files, instance or pod roles). ``cfg.anon`` reads public data.
    """
    cfg = cfg or StorageConfig()
    env = os.environ
    options = StorageOptions()
    endpoint = cfg.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    region = cfg.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    if cfg.anon:
        options["anon"] = True
    else:
        key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if key and secret:
            options["key"], options["secret"] = key, secret
            if env.get("AWS_SESSION_TOKEN"):
                options["token"] = env["AWS_SESSION_TOKEN"]
    # botocore retries throttling and 5xx answers per request; whole-shard retries are ours.
    options["config_kwargs"] = {"retries": {"max_attempts": cfg.max_retries + 1, "mode": "standard"}}
    return options


def protocol_of(url: str) -> str:
    """``s3://b/p`` -> ``s3``; a plain path -> ``file``."""
    protocol = fsspec.core.split_protocol(url)[0]
    return protocol or "file"


def filesystem(url: str, options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for any fsspec URL; ``options`` go to remote filesystems.

    fsspec caches instances per process, and s3fs instances must not cross a fork, so callers
    running in DataLoader workers call this again rather than carrying a filesystem over.
    """
    protocol = protocol_of(url)
    kwargs = dict(options or {}) if protocol not in ("file", "local", "memory") else {}
    if protocol not in S3_PROTOCOLS:
        kwargs = {k: v for k, v in kwargs.items() if k not in _S3_ONLY_KEYS}
    try:
        fs, path = fsspec.core.url_to_fs(url, **kwargs)
    except ImportError as exc:
        raise DataError(f"{redact_url(url)}: protocol {protocol!r} needs a package that is not "
                        f"installed ({exc})") from None
    except (ValueError, TypeError) as exc:
        raise DataError(f"{redact_url(url)}: not a usable fsspec URL ({exc}); expected e.g. "
                        f"s3://bucket/prefix, file:///path, a local path or memory://name") from None
    return fs, path.rstrip("/") or path


_S3_ONLY_KEYS = frozenset({"endpoint_url", "client_kwargs", "config_kwargs", "key", "secret",
                           "token", "anon"})


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def open_kwargs(fs: fsspec.AbstractFileSystem) -> dict[str, Any]:
    """Arguments for ``fs.open`` when streaming a whole shard sequentially."""
    if is_local(fs) or "memory" in fs.protocol:
        return {}
    return {"block_size": REMOTE_BLOCK_BYTES, "cache_type": "background"}


def is_transient(exc: BaseException) -> bool:
    """Whether retrying may help: network and server trouble yes, missing or forbidden no."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError,
                        NotADirectoryError, DataError)):
        return False
    if isinstance(exc, (OSError, EOFError, tarfile.ReadError, TimeoutError)):
        return True
    module = type(exc).__module__.split(".")[0]
    return module in ("botocore", "aiohttp", "urllib3", "requests", "gcsfs", "s3fs")


def is_storage_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from reaching or using storage (missing, forbidden, unreachable,
    throttled...), as opposed to a bug: such errors are reported as one line naming the URL."""
    if isinstance(exc, (OSError, EOFError, TimeoutError)):
        return True
    return type(exc).__module__.split(".")[0] in _STORAGE_ERROR_MODULES


_STORAGE_ERROR_MODULES = frozenset({"botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "s3fs", "gcsfs",
                                    "adlfs", "fsspec"})


def backoff_seconds(attempt: int, base: float = 0.5, cap: float = 20.0) -> float:
    """Exponential backoff with jitter, so workers that failed together do not retry together."""
    return min(cap, base * 2**attempt) * (0.5 + random.random() / 2)


def retrying(call: Callable[[], T], *, what: str, max_retries: int,
             sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()``, retried with backoff on transient errors; ``what`` names it in log lines."""
    attempt = 0
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc) or attempt >= max_retries:
                raise
            delay = backoff_seconds(attempt)
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(exc).__name__,
                        exc, attempt + 1, max_retries, delay)
            sleep(delay)
            attempt += 1


# A start-up check gives up fast: a wrong endpoint or a missing bucket should fail a job in
# seconds, before any cluster work, not after botocore's 60 s connect timeout times its retries.
PROBE_CONNECT_TIMEOUT_S = 5
PROBE_READ_TIMEOUT_S = 20
PROBE_ATTEMPTS = 2


def probe_options(options: dict[str, Any] | None) -> StorageOptions:
    """``options`` with short timeouts and one retry, for checks made before a job starts."""
    quick = StorageOptions(copy.deepcopy(dict(options or {})))
    quick["config_kwargs"] = {**quick.get("config_kwargs", {}), "connect_timeout": PROBE_CONNECT_TIMEOUT_S,
                              "read_timeout": PROBE_READ_TIMEOUT_S,
                              "retries": {"max_attempts": PROBE_ATTEMPTS, "mode": "standard"}}
    return quick


def check_writable(url: str, options: dict[str, Any] | None = None, *, name: str | None = None) -> None:
    """Raises DataError unless an object can be written (and is then deleted) under ``url``.

    Local and in-memory folders are created; on object storage nothing is created but the probe
    object: filesystems like s3fs create a missing *bucket* on ``makedirs``, and a bucket made
    by a typo is worse than an error. ``name`` is how the message names the location (default:
    the URL, credentials stripped). Remote checks use :func:`probe_options`, so an unreachable
    endpoint fails in seconds.
    """
    shown = name or redact_url(url)
    protocol = protocol_of(url)
    fs, root = filesystem(url, probe_options(options) if protocol in S3_PROTOCOLS else options)
    probe = posixpath.join(root, f".convmae-write-check-{uuid.uuid4().hex}")
    local = is_local(fs) or "memory" in fs.protocol
    try:
        if local:
            fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"")
    # Any failure here means the location is unusable; the job must stop with one line naming
    # it, whatever the filesystem raised.
    except Exception as exc:
        raise DataError(f"{shown}: {_unwritable_reason(exc, protocol, root, local)}") from None
    try:
        fs.rm_file(probe)
    except Exception as exc:  # writable is what was asked; a leftover empty object is harmless
        log.warning("could not delete the write check %s (%s: %s)", probe, type(exc).__name__, exc)


def _unwritable_reason(exc: Exception, protocol: str, root: str, local: bool) -> str:
    if protocol in S3_PROTOCOLS and isinstance(exc, FileNotFoundError):
        bucket = root.split("/", 1)[0]
        return f"bucket {bucket!r} does not exist; create it first (jobs never create buckets)"
    if "Credentials" in type(exc).__name__:  # botocore's NoCredentialsError, PartialCredentialsError
        return f"no usable credentials ({describe_error(exc)}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile"
    if isinstance(exc, PermissionError) and not local:
        return f"not writable with these credentials ({describe_error(exc)})"
    if not local and is_transient(exc):
        return f"cannot be reached ({describe_error(exc)})"
    return f"not writable ({describe_error(exc)})"


def describe_error(exc: BaseException) -> str:
    """``Type: first line of the message``: one line for an error message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
