"""Where ``prepare`` finds images: a folder or a single archive (tar, tar.gz, zip), any fsspec URL.

Layout: images directly under the root are unlabeled; images under ``root/<class>/...`` (the
ImageNet layout) are labeled by ``<class>`` (class numbers follow sorted class names). An
archive whose members all sit under one top folder is read as if that folder were the root;
a ``.tar`` inside a tar counts as a class folder named after it (ImageNet's train archive).

Images are written in a shuffled order (``shuffle_seed``), so every shard mixes classes and a
reader's shuffle buffer sees a fair sample. Compressed tars cannot be read out of order, so
they keep archive order.

Symbolic links in a local folder: a link to a file inside the folder is read as that file. A
link that leaves the folder (``cat.jpg -> /etc/passwd``, ``more -> /data``), to a file or a
folder, is refused: listing stops with a DataError naming the link and its target, so nothing
outside SRC ever lands in a shard. A dangling link is skipped with a warning and counted
(``ImageSource.skipped``); a link to a folder inside SRC is not followed (its images are read
through their own path), also with a warning. A hard-linked file whose other links are not
all inside the folder (``src/cat.jpg`` linked to ``/etc/passwd``) is skipped and counted.

Untrusted archives and folders (every skip below is counted in ``ImageSource.skipped``, which
the manifest records, and logged with examples):

- Names. Leading ``/`` and ``./`` and empty parts are dropped and backslashes read as ``/``; a
  name with a ``..`` part (``../evil.jpg``, ``cls/../../x.jpg``), a drive letter (``C:``) or a
  NUL is skipped, so nothing a shard holds can point outside the folder it is extracted in,
  and class names are plain folder names.
- Links. Archive members that are links (symbolic or hard) are skipped.
- Sizes. An image over ``SourceLimits.max_image_bytes`` (64 MiB), or a zip member that would
  expand more than ``max_expansion_ratio`` times (zip bombs), is skipped; members are read with
  a bounded read, never whole on the archive's word.
- Nesting. Tars inside tars are read ``max_nesting`` (8) levels deep; deeper ones are skipped.
"""

from __future__ import annotations

import logging
import os
import posixpath
import random
import re
import tarfile
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from service.data.errors import DataError
from service.data.shards import sanitize_key
from service.data.storage import describe_error, filesystem, is_local, is_storage_error, redact_url

log = logging.getLogger(__name__)

# Source file extension -> extension stored in the shard.
IMAGE_SUFFIXES = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# Files read together from a folder; remote filesystems fetch them concurrently.
READ_BATCH = 64
# A drive letter at the start of a member name (a Windows absolute path).
_DRIVE = re.compile(r"^[A-Za-z]:")
_S_IFMT, _S_IFLNK = 0o170000, 0o120000  # a zip member's Unix mode, in its external attributes


@dataclass(frozen=True)
class SourceLimits:
    """Bounds on what one source may make preparation read (see the module docstring)."""

    # No photo a training set needs is this large (an ImageNet JPEG is ~110 KB on average).
    max_image_bytes: int = 64 * 2**20
    # JPEG/PNG/WebP are compressed already: a zip member of photos expands ~1x; a thousandfold
    # is a bomb (deflate's maximum is ~1030x).
    max_expansion_ratio: float = 100.0
    # ImageNet's train archive is one level (a tar of class tars).
    max_nesting: int = 8

    def check(self) -> SourceLimits:
        if self.max_image_bytes < 1:
            raise DataError(f"max_image_bytes={self.max_image_bytes} is not allowed: >= 1 (e.g. 67108864 = 64 MiB)")
        if not self.max_expansion_ratio >= 1:
            raise DataError(f"max_expansion_ratio={self.max_expansion_ratio} is not allowed: >= 1 (e.g. 100)")
        if self.max_nesting < 0:
            raise DataError(f"max_nesting={self.max_nesting} is not allowed: >= 0 (0: no tar inside a tar)")
        return self


def safe_relative_path(name: str) -> str | None:
    """``name`` (an archive member or object key, relative to the source's root) as a plain
    relative path: ``./a//b.jpg`` and ``/a/b.jpg`` -> ``a/b.jpg``, backslashes read as ``/``;
    None for a name that could reach outside the root (a ``..`` part, a drive letter) or
    holds a NUL."""
    if "\0" in name:
        return None
    name = name.replace("\\", "/")
    if _DRIVE.match(name):
        return None
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


@dataclass(frozen=True, slots=True)
class SourceImage:
    key: str
    ext: str
    label: int  # -1: unlabeled
    locator: Any  # how the source finds the bytes (path, member name, offset...)


class ImageSource:
    """A listed set of images, in the order they will be written."""

    def __init__(self, description: str, limits: SourceLimits | None = None) -> None:
        self.description = description
        self.limits = (limits or SourceLimits()).check()
        self.images: list[SourceImage] = []
        self.class_names: tuple[str, ...] = ()
        self.skipped: dict[str, int] = {}  # what listing left out, by reason (dangling symlinks...)

    def skip(self, reason: str, examples: Sequence[str]) -> None:
        """Counts ``examples`` (all the names skipped for ``reason``) and warns naming a few."""
        if examples:
            self.skipped[reason] = self.skipped.get(reason, 0) + len(examples)
            log.warning("%s: skipped %d %s, e.g. %s", self.description, len(examples), reason,
                        ", ".join(name if name.isprintable() else repr(name) for name in examples[:3]))

    def skip_oversized(self, sized: Sequence[tuple[str, int]]) -> set[str]:
        """The names among (name, size) pairs over ``limits.max_image_bytes``, skipped."""
        over = [name for name, size in sized if size > self.limits.max_image_bytes]
        self.skip(f"files over {self.limits.max_image_bytes} bytes (max_image_bytes)", over)
        return set(over)

    def read(self, images: Sequence[SourceImage]) -> list[bytes]:
        """The bytes of ``images``; callers ask in write order."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def _index(self, entries: list[tuple[str, Any]], shuffle_seed: int | None,
               strip_common_root: bool = False) -> None:
        """Labels, keys and order from (relative path, locator) pairs; unsafe paths skipped;
        an archive's top folder that every member shares dropped (``strip_common_root``)."""
        images, skipped, unsafe, safe = [], Counter(), [], []
        for raw_path, locator in entries:
            path = safe_relative_path(raw_path)
            if path is None:
                unsafe.append(raw_path)
            else:
                safe.append((path, locator))
        if strip_common_root:
            safe = _strip_common_root(safe)
        for path, locator in safe:
            suffix = posixpath.splitext(path)[1].lower().lstrip(".")
            if suffix in IMAGE_SUFFIXES:
                images.append((path, locator, IMAGE_SUFFIXES[suffix]))
            else:
                skipped[suffix or "(none)"] += 1
        self.skip("names that are unsafe (a '..' part, a drive letter)", unsafe)
        if skipped:
            log.warning("%s: ignored %d files that are not jpg/png/webp (by extension: %s)",
                        self.description, sum(skipped.values()), dict(skipped.most_common(5)))
        if not images:
            raise DataError(f"{self.description}: no .jpg/.jpeg/.png/.webp images found")
        nested = [p for p, _, _ in images if "/" in p]
        if nested and len(nested) != len(images):
            flat = next(p for p, _, _ in images if "/" not in p)
            raise DataError(f"{self.description}: mixes images at the top level (e.g. {flat!r}) "
                            f"with images in class folders (e.g. {nested[0]!r}); use one layout: "
                            f"class/xxx.jpg for labeled data or flat for unlabeled")
        classes = sorted({p.split("/", 1)[0] for p in nested})
        label_of = {name: i for i, name in enumerate(classes)}
        used: set[str] = set()
        for path, locator, ext in images:
            key = sanitize_key(posixpath.splitext(path)[0])
            unique, n = key, 1
            while unique in used:
                unique, n = f"{key}_{n}", n + 1
            used.add(unique)
            label = label_of[path.split("/", 1)[0]] if nested else -1
            self.images.append(SourceImage(unique, ext, label, locator))
        self.class_names = tuple(classes)
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(self.images)


class FolderSource(ImageSource):
    def __init__(self, url: str, options: dict[str, Any] | None, shuffle_seed: int | None,
                 limits: SourceLimits | None = None, listing: bool = True) -> None:
        super().__init__(redact_url(url), limits)
        self.fs, self.root = filesystem(url, options)
        if not listing:
            return
        sized = self._local_files() if is_local(self.fs) else self._remote_files()
        oversized = self.skip_oversized(sized)
        paths = sorted(path for path, _ in sized if path not in oversized)
        prefix = self.root.rstrip("/") + "/"
        self._index([(p[len(prefix):], p) for p in paths if p.startswith(prefix)], shuffle_seed)

    def read(self, images: Sequence[SourceImage]) -> list[bytes]:
        paths = [image.locator for image in images]
        found = self.fs.cat(paths, on_error="raise")
        return [found[p] for p in paths]

    def _remote_files(self) -> list[tuple[str, int]]:
        found = self.fs.find(self.root, detail=True)
        return [(path, int(info.get("size") or 0)) for path, info in found.items()]

    def _local_files(self) -> list[tuple[str, int]]:
        """(path, size) of the files under a local root, links handled as the module
        docstring says."""
        real_root = os.path.realpath(self.root)
        files, dangling, folder_links = [], [], []
        # followlinks=False: a linked folder is listed in dirnames but never descended into.
        for folder, dirnames, filenames in os.walk(self.root):
            for name in sorted(dirnames):
                path = os.path.join(folder, name)
                if os.path.islink(path):
                    self._refuse_if_outside(path, real_root)
                    folder_links.append(path)
            for name in filenames:
                path = os.path.join(folder, name)
                if os.path.islink(path):
                    if not os.path.exists(path):
                        dangling.append(path)
                        continue
                    self._refuse_if_outside(path, real_root)
                files.append(path)
        for reason, paths in (("dangling symlinks", dangling), ("symlinked folders (not followed)", folder_links)):
            self.skip(reason, [f"{p} -> {os.readlink(p)}" for p in paths])
        return self._without_outside_hard_links(files)

    def _without_outside_hard_links(self, files: list[str]) -> list[tuple[str, int]]:
        """(path, size) of ``files`` but those hard-linked to a file outside the folder: a file
        of several links is kept only when every one of its links is found inside."""
        stats = {path: os.stat(path) for path in files}
        inside: dict[tuple[int, int], set[str]] = {}
        for path, stat in stats.items():
            if stat.st_nlink > 1:
                inside.setdefault((stat.st_dev, stat.st_ino), set()).add(os.path.realpath(path))
        outside = [path for path, stat in stats.items()
                   if stat.st_nlink > 1 and len(inside[(stat.st_dev, stat.st_ino)]) < stat.st_nlink]
        self.skip("hard-linked files with links outside the source folder", outside)
        skipped = set(outside)
        return [(path, stat.st_size) for path, stat in stats.items() if path not in skipped]

    def _refuse_if_outside(self, link: str, real_root: str) -> None:
        target = os.path.realpath(link)
        if os.path.commonpath([target, real_root]) != real_root:
            raise DataError(f"{self.description}: {link} is a symlink to {target}, outside the source folder; "
                            "refused (copy what it points to into the folder, or prepare that folder itself)")


def _strip_common_root(entries: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Drops a top folder that every member shares (``imagenet/cls/x.jpg`` -> ``cls/x.jpg``)."""
    tops = {path.split("/", 1)[0] for path, _ in entries}
    if len(tops) == 1 and all("/" in path for path, _ in entries):
        return [(path.split("/", 1)[1], loc) for path, loc in entries]
    return entries


class TarMembers:
    """What an archive's members come to: names of skipped ones by reason, as they are met."""

    LINKS = "archive members that are links"
    TOO_DEEP = "tars nested deeper than max_nesting"

    def __init__(self, source: ImageSource) -> None:
        self.source = source
        self.skipped: dict[str, list[str]] = {}

    def wanted(self, member: tarfile.TarInfo, path: str) -> bool:
        """Whether to read ``member`` (found at ``path``): a regular file, not a link, within
        the size bound; others are noted as skipped (directories and devices silently)."""
        if member.issym() or member.islnk():
            self.skipped.setdefault(self.LINKS, []).append(f"{path} -> {member.linkname}")
            return False
        if not member.isfile():
            return False
        if member.size > self.source.limits.max_image_bytes:
            reason = f"files over {self.source.limits.max_image_bytes} bytes (max_image_bytes)"
            self.skipped.setdefault(reason, []).append(path)
            return False
        return True

    def nested(self, member: tarfile.TarInfo, path: str, depth: int) -> bool:
        """Whether ``member`` is a tar to descend into at ``depth`` (deeper ones are noted)."""
        if not member.name.lower().endswith(".tar"):
            return False
        if depth >= self.source.limits.max_nesting:
            self.skipped.setdefault(self.TOO_DEEP, []).append(path)
            return False
        return True

    def report(self) -> None:
        for reason, names in self.skipped.items():
            self.source.skip(reason, names)


def _member_entries(tar: tarfile.TarFile, base: int, members: TarMembers, depth: int = 0,
                    folder: str = "") -> Iterator[tuple[str, tarfile.TarInfo, int]]:
    """(path, member, absolute data offset) of regular files, descending into nested .tar
    files as folders named after them, ``limits.max_nesting`` levels at most."""
    for member in tar:
        path = f"{folder}{member.name}"
        if not members.wanted(member, path):
            continue
        if members.nested(member, path, depth):
            stem = posixpath.splitext(posixpath.basename(member.name))[0]
            inner = tarfile.open(fileobj=tar.extractfile(member), mode="r:")
            yield from _member_entries(inner, base + member.offset_data, members, depth + 1,
                                       f"{folder}{stem}/")
        else:
            yield path, member, base + member.offset_data


class TarSource(ImageSource):
    """An uncompressed tar: members are read by offset, so any order is cheap."""

    def __init__(self, url: str, options: dict[str, Any] | None, shuffle_seed: int | None,
                 limits: SourceLimits | None = None, listing: bool = True) -> None:
        super().__init__(redact_url(url), limits)
        fs, path = filesystem(url, options)
        self._file: BinaryIO = fs.open(path, "rb")
        if not listing:
            return
        tar = tarfile.open(fileobj=self._file, mode="r:")
        members = TarMembers(self)
        entries = [(p, (offset, m.size)) for p, m, offset in _member_entries(tar, 0, members)]
        members.report()
        self._index(entries, shuffle_seed, strip_common_root=True)

    def read(self, images: Sequence[SourceImage]) -> list[bytes]:
        out = []
        for image in images:
            offset, size = image.locator
            self._file.seek(offset)
            out.append(self._file.read(min(size, self.limits.max_image_bytes + 1)))
        return out

    def close(self) -> None:
        self._file.close()


class CompressedTarSource(ImageSource):
    """A compressed tar, read front to back (twice: once to list, once to copy)."""

    def __init__(self, url: str, options: dict[str, Any] | None, limits: SourceLimits | None = None) -> None:
        super().__init__(redact_url(url), limits)
        self._fs, self._path = filesystem(url, options)
        members = TarMembers(self)
        entries = [(path, n) for n, (path, _) in enumerate(self._stream(members))]
        members.report()
        self._index(entries, shuffle_seed=None, strip_common_root=True)
        self._reader: Iterator[tuple[str, bytes]] | None = None
        self._next = 0
        log.warning("%s is compressed: images keep archive order, so shards are only as mixed "
                    "as the archive; an uncompressed tar or a folder gives shuffled shards",
                    self.description)

    def _stream(self, members: TarMembers, with_data: bool = False) -> Iterator[tuple[str, bytes]]:
        """(path, bytes) of the wanted members in archive order; a stream cannot seek, so a
        tar inside is read as it passes, one level deep."""
        with self._fs.open(self._path, "rb") as f:
            tar = tarfile.open(fileobj=f, mode="r|*")
            for member in tar:
                if not members.wanted(member, member.name):
                    continue
                data = tar.extractfile(member)
                if members.nested(member, member.name, depth=0):
                    stem = posixpath.splitext(posixpath.basename(member.name))[0]
                    inner = tarfile.open(fileobj=data, mode="r|")
                    for sub in inner:
                        path = f"{stem}/{sub.name}"
                        if members.wanted(sub, path):  # a tar in here is not an image: ignored
                            yield path, (inner.extractfile(sub).read() if with_data else b"")
                    continue
                yield member.name, (data.read() if with_data else b"")

    def read(self, images: Sequence[SourceImage]) -> list[bytes]:
        out = []
        for image in images:
            if self._reader is None or image.locator < self._next:
                self._reader, self._next = self._stream(TarMembers(self), with_data=True), 0
            while True:
                _, data = next(self._reader)
                self._next += 1
                if self._next - 1 == image.locator:
                    out.append(data)
                    break
        return out


class ZipSource(ImageSource):
    def __init__(self, url: str, options: dict[str, Any] | None, shuffle_seed: int | None,
                 limits: SourceLimits | None = None, listing: bool = True) -> None:
        super().__init__(redact_url(url), limits)
        fs, path = filesystem(url, options)
        self._file = fs.open(path, "rb")
        self._zip = zipfile.ZipFile(self._file)
        if not listing:
            return
        files = [info for info in self._zip.infolist() if not info.is_dir()]
        links = [info for info in files if (info.external_attr >> 16) & _S_IFMT == _S_IFLNK]
        self.skip("archive members that are links", [info.filename for info in links])
        files = [info for info in files if info not in links]
        oversized = self.skip_oversized([(info.filename, info.file_size) for info in files])
        ratio = self.limits.max_expansion_ratio
        bombs = [info.filename for info in files if info.filename not in oversized
                 and info.file_size > ratio * max(info.compress_size, 1)]
        self.skip(f"members that expand over {ratio:g} times (max_expansion_ratio)", bombs)
        refused = oversized | set(bombs)
        entries = [(info.filename, info.filename) for info in files if info.filename not in refused]
        self._index(entries, shuffle_seed, strip_common_root=True)

    def read(self, images: Sequence[SourceImage]) -> list[bytes]:
        # A bounded read: a member is never taken whole on the word of the archive's directory
        # (zipfile stops at the size it declares; the bound stops the rest).
        out = []
        for image in images:
            with self._zip.open(image.locator) as member:
                out.append(member.read(self.limits.max_image_bytes + 1))
        return out

    def close(self) -> None:
        self._zip.close()
        self._file.close()


class MemorySource(ImageSource):
    """Images already in memory (the embedded data set): (key, ext, bytes, label) tuples."""

    def __init__(self, description: str, items: Sequence[tuple[str, str, bytes, int]],
                 class_names: Sequence[str] = ()) -> None:
        super().__init__(description)
        self._data = [data for _, _, data, _ in items]
        self.images = [SourceImage(key, ext, label, i)
                       for i, (key, ext, _, label) in enumerate(items)]
        self.class_names = tuple(class_names)

    def read(self, images: Sequence[SourceImage]) -> list[bytes]:
        return [self._data[image.locator] for image in images]


def open_source(src: str, storage_options: dict[str, Any] | None = None,
                shuffle_seed: int | None = 0, limits: SourceLimits | None = None,
                listing: bool = True) -> ImageSource:
    """The image source at ``src``: a folder, or a .tar/.tar.gz/.tgz/.zip archive.

    ``listing=False`` opens it for :meth:`ImageSource.read` of images listed elsewhere (by
    the driver of a distributed preparation); a compressed tar cannot be read so.
    """
    fs, path = filesystem(src, storage_options)
    shown = redact_url(src)
    if not fs.exists(path):
        raise DataError(f"{shown}: source does not exist; expected an image folder "
                        f"(class/xxx.jpg or flat) or a .tar/.tar.gz/.zip archive")
    if fs.isdir(path):
        return FolderSource(src, storage_options, shuffle_seed, limits, listing)
    name = path.lower()
    try:
        if name.endswith(".zip"):
            return ZipSource(src, storage_options, shuffle_seed, limits, listing)
        if name.endswith(".tar"):
            return TarSource(src, storage_options, shuffle_seed, limits, listing)
        if name.endswith(_TAR_SUFFIXES):
            if not listing:
                raise DataError(f"{shown}: a compressed tar is read front to back only; it cannot "
                                "be split between workers")
            return CompressedTarSource(src, storage_options, limits)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{shown}: cannot read the archive ({type(exc).__name__}: {exc})") from None
    raise DataError(f"{shown}: a file, but not an archive this can read; allowed: "
                    f"{', '.join(_TAR_SUFFIXES)}, .zip, or an image folder")


def is_splittable(src: str) -> bool:
    """Whether the images of ``src`` can be read in any order by several readers (all but a
    compressed tar)."""
    name = src.lower().rstrip("/")
    return not (name.endswith(_TAR_SUFFIXES) and not name.endswith(".tar"))


def read_all(source: ImageSource, images: Sequence[SourceImage],
             start: int = 0) -> Iterator[tuple[SourceImage, bytes]]:
    """``images`` (of ``source``) from position ``start`` on, with their bytes, read in batches."""
    for begin in range(start, len(images), READ_BATCH):
        chunk = images[begin:begin + READ_BATCH]
        try:
            data = source.read(chunk)
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            raise DataError(f"{source.description}: cannot read images {chunk[0].key!r}..{chunk[-1].key!r} "
                            f"({describe_error(exc)})") from None
        yield from zip(chunk, data)
