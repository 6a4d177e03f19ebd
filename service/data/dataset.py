"""A prepared data set opened for reading: manifest checked up front, shards streamed on demand."""

from __future__ import annotations

import logging
import os
import posixpath
import time
from collections.abc import Callable, Iterator
from typing import Any

import fsspec

from service.config import StorageConfig
from service.data.errors import DataError
from service.data.manifest import MANIFEST_NAME, Manifest, ShardIndex, ShardInfo, index_name
from service.data.shards import ChecksumReader, RawSample, iter_samples
from service.data.storage import (
    S3_PROTOCOLS,
    backoff_seconds,
    filesystem,
    is_transient,
    open_kwargs,
    protocol_of,
    redact_url,
    storage_options,
)

log = logging.getLogger(__name__)


class ShardDataset:
    """A validated, complete shard data set. Cheap to pickle into DataLoader workers.

    Holds the URL, storage options and manifest, never a live filesystem: each process makes
    its own (s3fs clients do not survive a fork).
    """

    def __init__(self, url: str, manifest: Manifest, options: dict[str, Any],
                 max_retries: int = 5) -> None:
        self.url = url
        self.manifest = manifest
        self.options = options
        self.max_retries = max_retries
        self.sleep: Callable[[float], None] = time.sleep
        self._fs_pid = -1
        self._fs: fsspec.AbstractFileSystem | None = None
        self._root = ""
        self._offsets: dict[int, tuple[int, ...] | None] = {}

    def __repr__(self) -> str:
        return (f"ShardDataset({redact_url(self.url)!r}, num_samples={self.num_samples}, "
                f"num_shards={self.num_shards}, num_classes={self.num_classes})")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_fs=None, _fs_pid=-1, sleep=time.sleep)
        return state

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    @property
    def num_shards(self) -> int:
        return self.manifest.num_shards

    @property
    def has_labels(self) -> bool:
        return self.manifest.has_labels

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.manifest.class_names

    @property
    def shard_sizes(self) -> tuple[int, ...]:
        return tuple(s.num_samples for s in self.manifest.shards)

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """This process's filesystem and the data set's root path in it."""
        if self._fs is None or self._fs_pid != os.getpid():
            self._fs, self._root = filesystem(self.url, self.options)
            self._fs_pid = os.getpid()
        return self._fs, self._root

    def read(self, shard: int, start: int, stop: int) -> Iterator[RawSample]:
        """Samples ``start..stop-1`` of shard number ``shard``, in stored order.

        A transient error (connection reset, timeout, 5xx) re-opens the shard at the first
        sample not yet delivered, with backoff, up to ``max_retries`` times.
        """
        info = self.manifest.shards[shard]
        where = f"{redact_url(self.url)}/{info.name}"
        delivered, attempt = 0, 0
        while start + delivered < stop:
            try:
                for sample in self._read_once(shard, start + delivered, stop):
                    delivered += 1
                    yield sample
                if start + delivered < stop:
                    raise DataError(f"{where} ended after sample {start + delivered}; the "
                                    f"manifest says it holds {info.num_samples}")
            except Exception as exc:
                if not is_transient(exc) or attempt >= self.max_retries:
                    if isinstance(exc, DataError):
                        raise
                    raise DataError(f"reading {where} failed after {attempt} retries: "
                                    f"{type(exc).__name__}: {exc}") from exc
                delay = backoff_seconds(attempt)
                log.warning("reading %s at sample %d failed (%s: %s); retry %d/%d in %.1fs",
                            where, start + delivered, type(exc).__name__, exc, attempt + 1,
                            self.max_retries, delay)
                self.sleep(delay)
                attempt += 1

    def _read_once(self, shard: int, start: int, stop: int) -> Iterator[RawSample]:
        fs, root = self.filesystem()
        info = self.manifest.shards[shard]
        offsets = self._sample_offsets(shard) if start > 0 else None
        with fs.open(posixpath.join(root, info.name), "rb", **open_kwargs(fs)) as f:
            # A read of the whole shard is checked against the manifest's sha256 on the way
            # (sha256 runs at ~1 GB/s: ~0.1 ms for a 110 KB JPEG, ~3% of decoding and cropping
            # it). Partial reads (a rank's or worker's span that starts or ends inside a shard,
            # a resumed or retried read) are not checked: that would mean reading the rest of
            # the shard for them.
            whole = start == 0 and stop == info.num_samples
            source = ChecksumReader(f) if whole else f
            skip = start
            if offsets is not None:
                f.seek(offsets[start])
                skip = 0
            position = start - skip
            for sample in iter_samples(source, info.name, limit=skip + stop - start):
                if skip:
                    skip -= 1
                    position += 1
                    continue
                if isinstance(source, ChecksumReader) and position == stop - 1:
                    # Before the last sample leaves: consumers stop asking after it.
                    self._verify(source, info)
                position += 1
                yield sample

    def _verify(self, reader: ChecksumReader, info: ShardInfo) -> None:
        num_bytes, sha256 = reader.finish()
        if reader.complete and (num_bytes != info.num_bytes or sha256 != info.sha256):
            raise DataError(
                f"{redact_url(self.url)}/{info.name}: checksum mismatch: read {num_bytes} bytes "
                f"with sha256 {sha256}, {MANIFEST_NAME} says {info.num_bytes} bytes with sha256 "
                f"{info.sha256}; the shard was damaged or changed after preparation: restore it "
                f"or prepare the data set again (jobs/prepare_data.py --overwrite)")

    def _sample_offsets(self, shard: int) -> tuple[int, ...] | None:
        """Per-sample byte offsets from the shard's index file; None (read from the start)
        for data sets whose shards came without one."""
        if shard not in self._offsets:
            fs, root = self.filesystem()
            name = index_name(self.manifest.shards[shard].name)
            path = posixpath.join(root, name)
            try:
                text = fs.cat_file(path)
                index = ShardIndex.from_json(text, f"{redact_url(self.url)}/{name}")
                ok = index.info.num_samples == self.manifest.shards[shard].num_samples
                self._offsets[shard] = index.offsets if ok else None
            except (FileNotFoundError, DataError):
                self._offsets[shard] = None
        return self._offsets[shard]


def open_dataset(url: str, storage: StorageConfig | None = None) -> ShardDataset:
    """Opens a prepared data set, reading and checking its manifest and shard list up front.

    Raises DataError naming the URL and the problem: unknown protocol, missing bucket, missing
    prefix, no manifest (an incomplete or unprepared data set), a malformed manifest, or shards
    that the manifest lists but storage lacks.
    """
    if not url:
        raise DataError("data URL is empty; give s3://bucket/prefix, a local path or another "
                        "fsspec URL of a data set written by jobs/prepare_data.py")
    storage = storage or StorageConfig()
    shown = redact_url(url)
    options = storage_options(storage) if protocol_of(url) in S3_PROTOCOLS else {}
    fs, root = filesystem(url, options)
    # Listings are cached per filesystem instance; a data set finished by another process
    # since the last look must not appear incomplete.
    fs.invalidate_cache(root)
    manifest_path = posixpath.join(root, MANIFEST_NAME)
    try:
        # botocore already retries connection errors and 5xx answers for single requests.
        text = fs.cat_file(manifest_path)
    except FileNotFoundError:
        raise DataError(_why_no_manifest(fs, root, shown)) from None
    except PermissionError as exc:
        raise DataError(f"{shown}: access denied reading {MANIFEST_NAME} ({exc}); check the "
                        f"credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the role) "
                        f"and the bucket policy") from None
    except IsADirectoryError:
        raise DataError(f"{shown}: {MANIFEST_NAME} is a directory, not a manifest") from None
    except Exception as exc:
        raise DataError(f"{shown}: cannot read {MANIFEST_NAME}: {type(exc).__name__}: {exc}"
                        + _endpoint_hint(options)) from None
    manifest = Manifest.from_json(text, shown)
    _check_shards_present(fs, root, manifest, shown)
    return ShardDataset(url, manifest, options, max_retries=storage.max_retries)


def _endpoint_hint(options: dict[str, Any]) -> str:
    endpoint = options.get("endpoint_url")
    return f" (endpoint {endpoint})" if endpoint else ""


def _why_no_manifest(fs: fsspec.AbstractFileSystem, root: str, shown: str) -> str:
    how = "create it with: python jobs/prepare_data.py SRC " + shown
    if protocol_of(shown) in S3_PROTOCOLS:
        bucket = root.split("/", 1)[0]
        if not fs.exists(bucket):
            return f"{shown}: bucket {bucket!r} does not exist (or is not visible with these credentials)"
    if not fs.exists(root):
        return f"{shown}: no such prefix or directory; {how}"
    try:
        names = [posixpath.basename(p) for p in fs.ls(root, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return f"{shown}: is a file, not a data set directory"
    if any(n.endswith(".tar") for n in names):
        return (f"{shown}: incomplete data set: shards are there but {MANIFEST_NAME} is not, so "
                f"preparation was interrupted or is still running; re-run jobs/prepare_data.py "
                f"with the same SRC and DEST to finish it")
    # A folder of images (or of class folders): shards go beside it, never into it.
    dest = shown.rstrip("/") + "-shards"
    return (f"{shown}: not a prepared data set (no {MANIFEST_NAME}); if it holds images, pack them with: "
            f"python jobs/prepare_data.py {shown} {dest}, then use --data.url {dest}")


def _check_shards_present(fs: fsspec.AbstractFileSystem, root: str, manifest: Manifest,
                          shown: str) -> None:
    listing = {posixpath.basename(entry["name"]): entry.get("size")
               for entry in fs.ls(root, detail=True)}
    for shard in manifest.shards:
        size = listing.get(shard.name, -1)
        if size == -1:
            raise DataError(f"{shown}: shard {shard.name} is in {MANIFEST_NAME} but not in storage")
        if size is not None and size != shard.num_bytes:
            raise DataError(f"{shown}: shard {shard.name} has {size} bytes, {MANIFEST_NAME} "
                            f"says {shard.num_bytes}; the data set was changed after preparation")
