"""Packs images into WebDataset shards at any fsspec destination, resumably.

Each shard is built in a local temporary file, uploaded, and then recorded by its index file;
``manifest.json`` is written only after every shard is in place. Re-running with the same
source and destination keeps the shards whose index files match the source and continues
after them; a complete destination is left alone.
"""

from __future__ import annotations

import contextlib
import io
import logging
import posixpath
import re
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec
from PIL import Image

from service.data.errors import DataError
from service.data.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardIndex,
    ShardInfo,
    index_name,
    shard_name,
)
from service.data.scratch import scratch
from service.data.shards import ShardWriter, sample_tar_bytes
from service.data.sources import ImageSource, open_source, read_all
from service.data.storage import (
    check_writable,
    describe_error,
    filesystem,
    is_local,
    is_storage_error,
    redact_url,
    retrying,
)
from service.data.storage import storage_options as default_storage_options

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 256 * 2**20
_OUR_FILES = re.compile(r"^shard-(\d{6})\.(tar|index\.json)$")


def prepare_dataset(src: str, dest: str, *, shard_bytes: int = DEFAULT_SHARD_BYTES,
                    storage_options: dict[str, Any] | None = None,
                    samples_per_shard: int | None = None, shuffle_seed: int | None = 0,
                    overwrite: bool = False, max_retries: int = 5,
                    max_side: int | None = None) -> dict[str, Any]:
    """Packs the image folder or archive at ``src`` into a shard data set at ``dest``.

    ``storage_options`` apply to remote URLs; None: :func:`service.data.storage_options` of
    a default config, i.e. the AWS_* environment variables. Shards close at ``shard_bytes`` (or ``samples_per_shard`` samples, if given).
    ``shuffle_seed=None`` keeps the source order. ``max_side``: see :func:`limit_side`.
    Returns the manifest as a dict.

    Symlinks in a local ``src`` that leave it are refused (see ``service.data.sources``). A
    missing destination bucket is an error, never created. Storage errors (unreachable,
    forbidden, missing) are DataErrors of one line naming the URL.
    """
    if storage_options is None:
        storage_options = default_storage_options()
    with storage_errors_named(src, "cannot read the source"):
        source = open_source(src, storage_options, shuffle_seed)
    try:
        with storage_errors_named(dest, "cannot write the data set"):
            return write_dataset(source, dest, shard_bytes=shard_bytes,
                                 storage_options=storage_options,
                                 samples_per_shard=samples_per_shard, overwrite=overwrite,
                                 max_retries=max_retries, max_side=max_side,
                                 extra={"shuffle_seed": shuffle_seed,
                                        **({"skipped": source.skipped} if source.skipped else {})})
    finally:
        source.close()


@contextlib.contextmanager
def storage_errors_named(url: str, doing: str) -> Iterator[None]:
    """Turns a storage error (not a bug) into a one-line DataError naming ``url``."""
    try:
        yield
    except DataError:
        raise
    except Exception as exc:
        if not is_storage_error(exc):
            raise
        raise DataError(f"{redact_url(url)}: {doing} ({describe_error(exc)})") from None


def write_dataset(source: ImageSource, dest: str, *, shard_bytes: int = DEFAULT_SHARD_BYTES,
                  storage_options: dict[str, Any] | None = None,
                  samples_per_shard: int | None = None, overwrite: bool = False,
                  max_retries: int = 5, extra: dict[str, Any] | None = None,
                  max_side: int | None = None) -> dict[str, Any]:
    """Writes ``source``'s images, in its order, as a shard data set at ``dest``; with
    ``max_side``, images are stored at most that size (:func:`limit_side`)."""
    if shard_bytes < 4096:
        raise DataError(f"shard_bytes={shard_bytes} is not allowed: at least 4096")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise DataError(f"samples_per_shard={samples_per_shard} is not allowed: >= 1 or None")
    if max_side is not None and max_side < 16:
        raise DataError(f"max_side={max_side} is not allowed: >= 16 or None")
    fs, root = filesystem(dest, storage_options)
    shown = redact_url(dest)
    # Before any image is read: a missing bucket or an unreachable endpoint fails in seconds,
    # and a bucket is never created (s3fs's makedirs would create one).
    check_writable(dest, storage_options)
    fs.invalidate_cache(root)
    total = len(source.images)
    if overwrite:
        _remove_ours(fs, root, keep_below=0)
    else:
        existing = _complete_manifest(fs, root, shown)
        if existing is not None:
            if existing.num_samples != total or existing.source != source.description:
                raise DataError(f"{shown} already holds a complete data set of "
                                f"{existing.num_samples} images from {existing.source!r}, not "
                                f"the {total} images of {source.description!r}; choose another "
                                f"destination or overwrite it")
            log.info("%s is already complete (%d images in %d shards); nothing to do",
                     shown, existing.num_samples, existing.num_shards)
            return existing.to_dict()
    done = _finished_shards(fs, root, source)
    position = sum(index.info.num_samples for index in done)
    if done:
        log.info("%s: resuming after %d finished shards (%d/%d images)", shown, len(done),
                 position, total)
    labeled = bool(source.class_names)
    started, written, resized = time.monotonic(), 0, 0
    with scratch("shard") as tmp:
        writer: ShardWriter | None = None
        for image, data in read_all(source, position):
            if max_side is not None:
                stored = limit_side(data, max_side)
                resized += stored is not data
                data = stored
            if writer is not None and (
                writer.size_with(sample_tar_bytes(len(data), labeled)) > shard_bytes
                or writer.num_samples == samples_per_shard
            ):
                done.append(_finish(writer, fs, root, shown, max_retries))
                _log_progress(shown, done, total, written, started)
                writer = None
            if writer is None:
                writer = ShardWriter(str(Path(tmp) / shard_name(len(done))))
            writer.add(image.key, image.ext, data, image.label)
            written += 1
        if writer is not None:
            done.append(_finish(writer, fs, root, shown, max_retries))
            _log_progress(shown, done, total, written, started)
    _remove_ours(fs, root, keep_below=len(done))
    manifest = Manifest(shards=tuple(index.info for index in done),
                        num_classes=len(source.class_names), class_names=source.class_names,
                        source=source.description,
                        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        extra={"shard_bytes": shard_bytes, "samples_per_shard": samples_per_shard,
                               **({"max_side": max_side, "resized_by_this_run": resized}
                                  if max_side is not None else {}),
                               **(extra or {})})
    _write_last(fs, posixpath.join(root, MANIFEST_NAME), manifest.to_json().encode())
    log.info("%s complete: %d images in %d shards", shown, manifest.num_samples,
             manifest.num_shards)
    return manifest.to_dict()


# Re-encoding quality for lossy formats: visually lossless at training resolutions.
REENCODE_QUALITY = 90
_SAVE_OPTIONS = {"JPEG": {"quality": REENCODE_QUALITY}, "WEBP": {"quality": REENCODE_QUALITY}}


def limit_side(data: bytes, max_side: int) -> bytes:
    """``data`` itself when the image's shorter side is at most ``max_side`` (or it cannot be
    read: the loader will count it); else the image scaled down (aspect kept, Lanczos) so
    that its shorter side is ``max_side``, re-encoded in its own format."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if min(width, height) <= max_side:
                return data
            ratio = max_side / min(width, height)
            size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
            fmt = img.format or "PNG"
            # A JPEG decodes at the smallest DCT scale that still covers the new size.
            img.draft(img.mode, size)
            smaller = img.resize(size, Image.Resampling.LANCZOS)
            out = io.BytesIO()
            smaller.save(out, format=fmt, **_SAVE_OPTIONS.get(fmt, {}))
            return out.getvalue()
    except Exception as exc:  # an unreadable image is stored as it is, and skipped when read
        log.warning("cannot scale an image down (%s: %s); storing it as it is", type(exc).__name__, exc)
        return data


def _complete_manifest(fs: fsspec.AbstractFileSystem, root: str, shown: str) -> Manifest | None:
    try:
        return Manifest.from_json(fs.cat_file(posixpath.join(root, MANIFEST_NAME)), shown)
    except FileNotFoundError:
        return None
    except DataError as exc:
        log.warning("ignoring the unreadable manifest at %s (%s); it will be rewritten", shown, exc)
        return None


def _finished_shards(fs: fsspec.AbstractFileSystem, root: str,
                     source: ImageSource) -> list[ShardIndex]:
    """Leading shards already written for this source in this order."""
    done: list[ShardIndex] = []
    position = 0
    while True:
        name = shard_name(len(done))
        try:
            index = ShardIndex.from_json(fs.cat_file(posixpath.join(root, index_name(name))), name)
            size = fs.size(posixpath.join(root, name))
        except (FileNotFoundError, DataError):
            return done
        last = position + index.info.num_samples - 1
        if (size != index.info.num_bytes or last >= len(source.images)
                or source.images[position].key != index.first_key
                or source.images[last].key != index.last_key):
            log.warning("%s does not match the source (changed, or another order); rewriting "
                        "from it on", name)
            return done
        done.append(index)
        position = last + 1


def _finish(writer: ShardWriter, fs: fsspec.AbstractFileSystem, root: str, shown: str,
            max_retries: int) -> ShardIndex:
    num_bytes, sha256 = writer.close()
    name = Path(writer.path).name
    remote = posixpath.join(root, name)
    retrying(lambda: fs.put_file(writer.path, remote), what=f"uploading {shown}/{name}",
             max_retries=max_retries)
    Path(writer.path).unlink()
    index = ShardIndex(ShardInfo(name, writer.num_samples, num_bytes, sha256),
                       first_key=writer.first_key, last_key=writer.last_key,
                       offsets=tuple(writer.offsets))
    # The index goes after its shard: an index file vouches for a fully uploaded shard.
    retrying(lambda: fs.pipe_file(posixpath.join(root, index_name(name)), index.to_json().encode()),
             what=f"writing {shown}/{index_name(name)}", max_retries=max_retries)
    return index


def _write_last(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Writes ``path`` so that readers never see it half-written (object stores put whole
    objects; local files are renamed into place)."""
    if is_local(fs):
        tmp = path + ".tmp"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def _remove_ours(fs: fsspec.AbstractFileSystem, root: str, keep_below: int) -> None:
    """Deletes this format's shard and index files numbered ``keep_below`` or more (left by an
    earlier run), plus the manifest when everything goes; nothing else is touched."""
    manifest = posixpath.join(root, MANIFEST_NAME)
    if keep_below == 0 and fs.exists(manifest):
        fs.rm_file(manifest)  # first, so a half-deleted data set never looks complete
    try:
        listed = fs.ls(root, detail=False)
    except FileNotFoundError:  # an object-store prefix with nothing in it yet
        return
    doomed = []
    for path in listed:
        match = _OUR_FILES.match(posixpath.basename(path))
        if match and int(match.group(1)) >= keep_below:
            doomed.append(path)
    if doomed:
        fs.rm(doomed)


def _log_progress(shown: str, done: list[ShardIndex], total: int, written: int,
                  started: float) -> None:
    last = done[-1].info
    finished = sum(index.info.num_samples for index in done)
    rate = written / max(time.monotonic() - started, 1e-9)
    log.info("%s/%s: %d images, %.1f MB | %d/%d images (%.0f%%), %.0f images/s", shown,
             last.name, last.num_samples, last.num_bytes / 2**20, finished, total,
             100 * finished / max(total, 1), rate)
