"""Packs images into WebDataset shards at any fsspec destination, resumably.

Each shard is built in a local temporary file, uploaded, and then recorded by its index file;
``manifest.json`` is written only after every shard is in place. Re-running with the same
source and destination keeps the shards whose index files match the source and continues
after them; a complete destination is left alone.

Split into ranges (``num_ranges``, written by other processes: ``service.runtime.preparation``),
the source's write order is cut into consecutive ranges, each written as its own shards
(``shard-RRRRR-NNNNNN.tar``) and resumed on its own the same way; the manifest lists them in
range order and is written last by the caller's process.

With ``val_fraction``, a validation split drawn by a hash of each image's key is written first,
as a data set of its own at ``<dest>/val``; ``dest`` holds the other images. The draw depends
on the keys alone, so resumed runs and any number of workers write the same two splits.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import posixpath
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec
from PIL import Image

from service.data.errors import DataError
from service.data.jpeg import CorruptJpeg, check_jpeg_stream
from service.data.manifest import (
    MANIFEST_NAME,
    VAL_SPLIT,
    Manifest,
    ShardIndex,
    ShardInfo,
    index_name,
    range_shard_name,
    shard_name,
    validation_url,
)
from service.data.scratch import scratch
from service.data.shards import ShardWriter, sample_tar_bytes
from service.data.sources import (
    ImageSource,
    SourceImage,
    SourceLimits,
    SubsetSource,
    is_splittable,
    open_source,
    read_all,
)
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
_OUR_FILES = re.compile(r"^shard-(\d{5}-)?\d{6}\.(tar|index\.json)$")


def prepare_dataset(src: str, dest: str, *, shard_bytes: int = DEFAULT_SHARD_BYTES,
                    storage_options: dict[str, Any] | None = None,
                    samples_per_shard: int | None = None, shuffle_seed: int | None = 0,
                    overwrite: bool = False, max_retries: int = 5,
                    max_side: int | None = None, limits: SourceLimits | None = None,
                    num_ranges: int = 1, run_ranges: RangeRunner | None = None,
                    val_fraction: float = 0.0) -> dict[str, Any]:
    """Packs the image folder or archive at ``src`` into a shard data set at ``dest``.

    ``storage_options`` apply to remote URLs; None: :func:`service.data.storage_options` of
    a default config, i.e. the AWS_* environment variables. Shards close at ``shard_bytes`` (or ``samples_per_shard`` samples, if given).
    ``shuffle_seed=None`` keeps the source order. ``max_side``: see :func:`limit_side`.
    ``limits``: what one image may cost (``service.data.sources.SourceLimits``).
    ``num_ranges`` > 1 splits the images into that many consecutive ranges, each written as
    its own shards by ``run_ranges`` (several processes or machines; see
    ``service.runtime.preparation``); a compressed tar is always one range.
    ``val_fraction`` > 0 holds that fraction of the images out as a validation split, written
    first as its own data set at ``<dest>/val`` (:func:`split_validation`); ``dest`` gets the
    rest. Returns the (training) manifest as a dict.

    Symlinks in a local ``src`` that leave it are refused (see ``service.data.sources``). A
    missing destination bucket is an error, never created. Storage errors (unreachable,
    forbidden, missing) are DataErrors of one line naming the URL.
    """
    if not 0.0 <= val_fraction <= MAX_VAL_FRACTION:
        raise DataError(f"val_fraction={val_fraction} is not allowed: from 0 (no validation split) "
                        f"to {MAX_VAL_FRACTION}, e.g. 0.05")
    if storage_options is None:
        storage_options = default_storage_options()
    with storage_errors_named(src, "cannot read the source"):
        source = open_source(src, storage_options, shuffle_seed, limits)
    if num_ranges > 1 and not is_splittable(src):
        log.warning("%s is a compressed tar, read front to back: prepared by one process", source.description)
        num_ranges = 1
    settings = dict(shard_bytes=shard_bytes, storage_options=storage_options,
                    samples_per_shard=samples_per_shard, overwrite=overwrite, max_retries=max_retries,
                    max_side=max_side, num_ranges=num_ranges, run_ranges=run_ranges, src=src)
    try:
        with storage_errors_named(dest, "cannot write the data set"):
            check_writable(dest, storage_options)  # an unreachable or missing bucket: in seconds
            if not overwrite:
                _refuse_another_split(dest, storage_options, val_fraction)
            train, val = split_validation(source, val_fraction)
            val_dest = validation_url(dest)
            if val is None:
                _remove_stale_split(val_dest, storage_options)
                held_out = {}
            else:
                # First: a complete training manifest then vouches for a complete split beside it.
                log.info("%s: holding out %d of %d images for validation (val_fraction=%g) at %s",
                         source.description, len(val.images), len(source.images), val_fraction,
                         redact_url(val_dest))
                write_dataset(val, val_dest, **settings,
                              extra={"shuffle_seed": shuffle_seed, "split": "val", "val_fraction": val_fraction})
                held_out = {"val_images": len(val.images)}
            return write_dataset(train, dest, **settings,
                                 extra={"shuffle_seed": shuffle_seed, "val_fraction": val_fraction, **held_out})
    finally:
        source.close()


# More than half held out leaves a training set smaller than its validation set.
MAX_VAL_FRACTION = 0.5


def is_held_out(key: str, val_fraction: float) -> bool:
    """Whether the image ``key`` falls in the validation split of ``val_fraction``. A stable
    hash of the key alone (not of the listing order, the shuffle seed or the worker count):
    every run, resumed or spread over workers, draws the same split, and images added to the
    source later never move the others between splits."""
    draw = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return draw < val_fraction * 2**64


def split_validation(source: ImageSource, val_fraction: float) -> tuple[ImageSource, ImageSource | None]:
    """(training images, validation images or None) of ``source``, in its write order: about
    ``val_fraction`` of them held out (:func:`is_held_out`). None when ``val_fraction`` is 0, or
    when the draw holds out no image or every image (a handful of images), logged. Labeled or
    not, a source is split alike: an unlabeled split still gives val/recon_loss."""
    if val_fraction <= 0:
        return source, None
    held = [is_held_out(image.key, val_fraction) for image in source.images]
    if not any(held) or all(held):
        log.warning("%s: no validation split held out: val_fraction=%g of %d images draws %d of them",
                    source.description, val_fraction, len(held), sum(held))
        return source, None
    train = [image for image, out in zip(source.images, held) if not out]
    val = [image for image, out in zip(source.images, held) if out]
    return SubsetSource(source, train, source.skipped), SubsetSource(source, val)


def _refuse_another_split(dest: str, storage_options: dict[str, Any], val_fraction: float) -> None:
    """A complete data set at ``dest`` split with another ``val_fraction`` (none recorded: 0)
    is refused before anything is written; its split is kept whole."""
    fs, root = filesystem(dest, storage_options)
    existing = _complete_manifest(fs, root, redact_url(dest))
    if existing is None:
        return
    recorded = float(existing.extra.get("val_fraction", 0.0))
    if recorded != val_fraction:
        raise DataError(f"{redact_url(dest)} already holds a complete data set prepared with "
                        f"val_fraction={recorded:g}, not {val_fraction:g}; rerun with "
                        f"--val_fraction {recorded:g} to keep it, or --overwrite to split it anew")


def _remove_stale_split(val_dest: str, storage_options: dict[str, Any]) -> None:
    """Removes a validation split an earlier run held out at ``val_dest`` (its manifest says
    so) when this run holds out none: it would overlap the training images. A data set of
    one's own put there is left alone."""
    fs, root = filesystem(val_dest, storage_options)
    existing = _complete_manifest(fs, root, redact_url(val_dest))
    if existing is not None and existing.extra.get("split") == VAL_SPLIT:
        log.warning("%s: removing the validation split an earlier run held out (val_fraction=%s); "
                    "this run holds out none", redact_url(val_dest), existing.extra.get("val_fraction"))
        _remove_ours(fs, root, keep=set())


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


@dataclass(frozen=True)
class RangeJob:
    """One range of a source's images to write as shards: everything a process needs for it
    (picklable; no credentials: a worker finds its own)."""

    src: str
    dest: str
    number: int  # which range; its shards are named after it (one range: shard-NNNNNN.tar)
    num_ranges: int
    start: int  # position of images[0] in the source's write order
    images: tuple[SourceImage, ...]
    labeled: bool
    shard_bytes: int
    samples_per_shard: int | None
    max_side: int | None
    max_retries: int
    limits: SourceLimits

    def shard_name(self, index: int) -> str:
        return shard_name(index) if self.num_ranges == 1 else range_shard_name(self.number, index)


@dataclass(frozen=True)
class RangeResult:
    shards: tuple[ShardIndex, ...]
    resized: int  # images scaled down (max_side) by this run


# Writes the ranges of a preparation somewhere (other processes), in any order; returns their
# results in the ranges' order.
RangeRunner = Callable[[list[RangeJob]], list[RangeResult]]


def plan_ranges(source: ImageSource, src: str, dest: str, num_ranges: int, **settings: Any) -> list[RangeJob]:
    """``source``'s images in ``num_ranges`` consecutive ranges of near-equal length (fewer
    when there are fewer images): the same ranges for the same listing and count."""
    total = len(source.images)
    count = max(1, min(num_ranges, total))
    bounds = [total * i // count for i in range(count + 1)]
    return [RangeJob(src=src, dest=dest, number=i, num_ranges=count, start=bounds[i],
                     images=tuple(source.images[bounds[i]:bounds[i + 1]]),
                     labeled=bool(source.class_names), limits=source.limits, **settings)
            for i in range(count)]


def write_dataset(source: ImageSource, dest: str, *, shard_bytes: int = DEFAULT_SHARD_BYTES,
                  storage_options: dict[str, Any] | None = None,
                  samples_per_shard: int | None = None, overwrite: bool = False,
                  max_retries: int = 5, extra: dict[str, Any] | None = None,
                  max_side: int | None = None, num_ranges: int = 1,
                  run_ranges: RangeRunner | None = None, src: str = "") -> dict[str, Any]:
    """Writes ``source``'s images, in its order, as a shard data set at ``dest``; with
    ``max_side``, images are stored at most that size (:func:`limit_side`). Images refused
    when read (:func:`refusal`) are skipped, logged and counted in the manifest.
    ``num_ranges``/``run_ranges``: see :func:`prepare_dataset`."""
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
        _remove_ours(fs, root, keep=set())
    else:
        existing = _complete_manifest(fs, root, shown)
        if existing is not None:
            listed = existing.extra.get("source_images", existing.num_samples)
            if listed != total or existing.source != source.description:
                raise DataError(f"{shown} already holds a complete data set of "
                                f"{listed} images from {existing.source!r}, not "
                                f"the {total} images of {source.description!r}; choose another "
                                f"destination or overwrite it")
            log.info("%s is already complete (%d images in %d shards); nothing to do",
                     shown, existing.num_samples, existing.num_shards)
            return existing.to_dict()
    jobs = plan_ranges(source, src, dest, num_ranges if run_ranges is not None else 1,
                       shard_bytes=shard_bytes, samples_per_shard=samples_per_shard,
                       max_side=max_side, max_retries=max_retries)
    if len(jobs) > 1 and run_ranges is not None:
        log.info("%s: %d images in %d ranges, written in parallel", shown, total, len(jobs))
        results = run_ranges(jobs)
    else:
        results = [write_range(jobs[0], source, fs, root)]
    shards = tuple(index for result in results for index in result.shards)
    _remove_ours(fs, root, keep={name for index in shards
                                 for name in (index.info.name, index_name(index.info.name))})
    if not shards:
        raise DataError(f"{source.description}: none of its {total} images could be read as an image "
                        "(see the warnings above)")
    skipped = dict(source.skipped)
    refused = total - sum(index.info.num_samples for index in shards)
    if refused:
        skipped[REFUSED_WHEN_READ] = refused
    manifest = Manifest(shards=tuple(index.info for index in shards),
                        num_classes=len(source.class_names), class_names=source.class_names,
                        source=source.description,
                        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        extra={"shard_bytes": shard_bytes, "samples_per_shard": samples_per_shard,
                               **({"max_side": max_side,
                                   "resized_by_this_run": sum(r.resized for r in results)}
                                  if max_side is not None else {}),
                               **(extra or {}), "source_images": total,
                               **({"skipped": skipped} if skipped else {})})
    _write_last(fs, posixpath.join(root, MANIFEST_NAME), manifest.to_json().encode())
    log.info("%s complete: %d images in %d shards", shown, manifest.num_samples,
             manifest.num_shards)
    return manifest.to_dict()


REFUSED_WHEN_READ = "images refused when read (truncated or too many scans, over max_image_bytes)"


def refusal(image: SourceImage, data: bytes, limits: SourceLimits) -> str | None:
    """Why ``image`` (with its bytes ``data``) is not packed, or None: over the size bound
    (a file that grew since listing, a member larger than its archive said), a JPEG cut short
    or of too many scans (``service.data.jpeg.check_jpeg_stream``)."""
    if len(data) > limits.max_image_bytes:
        return f"over {limits.max_image_bytes} bytes (max_image_bytes)"
    if image.ext == "jpg":
        try:
            check_jpeg_stream(data)
        except CorruptJpeg as exc:
            return str(exc)
    return None


def write_range(job: RangeJob, source: ImageSource, fs: fsspec.AbstractFileSystem,
                root: str) -> RangeResult:
    """Writes ``job``'s images, read from ``source``, as its shards under ``root``, after
    those of its shards an earlier run finished (checked against the images)."""
    shown = redact_url(job.dest)
    done, position = _finished_shards(fs, root, job)
    total = len(job.images)
    if done:
        log.info("%s: resuming after %d finished shards (%d/%d images)", shown, len(done),
                 position, total)
    started, written, resized = time.monotonic(), 0, 0
    progress = _Progress(shown, total, started)
    with scratch("shard") as tmp:
        writer: ShardWriter | None = None
        for image, data in read_all(source, job.images, position):
            why = refusal(image, data, job.limits)
            if why is not None:
                log.warning("%s: skipped image %r: %s", source.description, image.key, why)
                continue
            if job.max_side is not None:
                stored = limit_side(data, job.max_side)
                resized += stored is not data
                data = stored
            if writer is not None and (
                writer.size_with(sample_tar_bytes(len(data), job.labeled)) > job.shard_bytes
                or writer.num_samples == job.samples_per_shard
            ):
                done.append(_finish(writer, fs, root, shown, job.max_retries))
                progress.shard_done(done, written)
                writer = None
            if writer is None:
                writer = ShardWriter(str(Path(tmp) / job.shard_name(len(done))))
            writer.add(image.key, image.ext, data, image.label)
            written += 1
        if writer is not None:
            done.append(_finish(writer, fs, root, shown, job.max_retries))
            progress.shard_done(done, written)
    return RangeResult(tuple(done), resized)


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
                     job: RangeJob) -> tuple[list[ShardIndex], int]:
    """The range's leading shards already written for these images in this order, and the
    position (in ``job.images``) of the first image after them. A shard's first and last keys
    place it; images between them that it lacks were refused when read."""
    position_of = {image.key: i for i, image in enumerate(job.images)}
    done: list[ShardIndex] = []
    position = 0
    while True:
        name = job.shard_name(len(done))
        try:
            index = ShardIndex.from_json(fs.cat_file(posixpath.join(root, index_name(name))), name)
            size = fs.size(posixpath.join(root, name))
        except (FileNotFoundError, DataError):
            return done, position
        first = position_of.get(index.first_key, -1)
        last = position_of.get(index.last_key, -1)
        if (size != index.info.num_bytes or not position <= first <= last
                or last - first + 1 < index.info.num_samples):
            log.warning("%s does not match the source (changed, or another order); rewriting "
                        "from it on", name)
            return done, position
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


def _remove_ours(fs: fsspec.AbstractFileSystem, root: str, keep: set[str]) -> None:
    """Deletes this format's shard and index files but those named in ``keep`` (left by an
    earlier run), plus the manifest when everything goes; nothing else is touched."""
    manifest = posixpath.join(root, MANIFEST_NAME)
    if not keep and fs.exists(manifest):
        fs.rm_file(manifest)  # first, so a half-deleted data set never looks complete
    try:
        listed = fs.ls(root, detail=False)
    except FileNotFoundError:  # an object-store prefix with nothing in it yet
        return
    doomed = [path for path in listed
              if _OUR_FILES.match(posixpath.basename(path)) and posixpath.basename(path) not in keep]
    if doomed:
        fs.rm(doomed)


# Seconds between progress lines: the first shard is logged at once, then one line per interval
# (a small data set of a dozen shards written in a second logs one line, not a dozen).
PROGRESS_EVERY_S = 10.0


class _Progress:
    def __init__(self, shown: str, total: int, started: float) -> None:
        self.shown, self.total, self.started = shown, total, started
        self.last_logged: float | None = None

    def shard_done(self, done: list[ShardIndex], written: int) -> None:
        now = time.monotonic()
        if self.last_logged is not None and now - self.last_logged < PROGRESS_EVERY_S:
            return
        self.last_logged = now
        last = done[-1].info
        finished = sum(index.info.num_samples for index in done)
        rate = written / max(now - self.started, 1e-9)
        log.info("%s/%s: %d images, %.1f MB | %d/%d images (%.0f%%), %.0f images/s", self.shown,
                 last.name, last.num_samples, last.num_bytes / 2**20, finished, self.total,
                 100 * finished / max(self.total, 1), rate)
