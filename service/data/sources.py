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
through their own path), also with a warning. Archive members that are links are never read.
"""

from __future__ import annotations

import logging
import os
import posixpath
import random
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


@dataclass(frozen=True, slots=True)
class SourceImage:
    key: str
    ext: str
    label: int  # -1: unlabeled
    locator: Any  # how the source finds the bytes (path, member name, offset...)


class ImageSource:
    """A listed set of images, in the order they will be written."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.images: list[SourceImage] = []
        self.class_names: tuple[str, ...] = ()
        self.skipped: dict[str, int] = {}  # what listing left out, by reason (dangling symlinks...)

    def read(self, images: Sequence[SourceImage]) -> list[bytes]:
        """The bytes of ``images``; callers ask in write order."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def _index(self, entries: list[tuple[str, Any]], shuffle_seed: int | None) -> None:
        """Labels, keys and order from (relative path, locator) pairs."""
        images, skipped = [], Counter()
        for path, locator in entries:
            suffix = posixpath.splitext(path)[1].lower().lstrip(".")
            if suffix in IMAGE_SUFFIXES:
                images.append((path, locator, IMAGE_SUFFIXES[suffix]))
            else:
                skipped[suffix or "(none)"] += 1
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
    def __init__(self, url: str, options: dict[str, Any] | None, shuffle_seed: int | None) -> None:
        super().__init__(redact_url(url))
        self.fs, self.root = filesystem(url, options)
        paths = sorted(self._local_files() if is_local(self.fs) else self.fs.find(self.root))
        prefix = self.root.rstrip("/") + "/"
        self._index([(p[len(prefix):], p) for p in paths if p.startswith(prefix)], shuffle_seed)

    def read(self, images: Sequence[SourceImage]) -> list[bytes]:
        paths = [image.locator for image in images]
        found = self.fs.cat(paths, on_error="raise")
        return [found[p] for p in paths]

    def _local_files(self) -> list[str]:
        """Files under a local root, symlinks handled as the module docstring says."""
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
            if paths:
                self.skipped[reason] = len(paths)
                log.warning("%s: skipped %d %s, e.g. %s", self.description, len(paths), reason,
                            ", ".join(f"{p} -> {os.readlink(p)}" for p in paths[:3]))
        return files

    def _refuse_if_outside(self, link: str, real_root: str) -> None:
        target = os.path.realpath(link)
        if os.path.commonpath([target, real_root]) != real_root:
            raise DataError(f"{self.description}: {link} is a symlink to {target}, outside the source folder; "
                            "refused (copy what it points to into the folder, or prepare that folder itself)")


def _clean(member_name: str) -> str:
    while member_name.startswith("./"):
        member_name = member_name[2:]
    return member_name.lstrip("/")


def _strip_common_root(entries: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Drops a top folder that every member shares (``imagenet/cls/x.jpg`` -> ``cls/x.jpg``)."""
    tops = {path.split("/", 1)[0] for path, _ in entries}
    if len(tops) == 1 and all("/" in path for path, _ in entries):
        return [(path.split("/", 1)[1], loc) for path, loc in entries]
    return entries


def _member_entries(tar: tarfile.TarFile, base: int) -> Iterator[tuple[str, tarfile.TarInfo, int]]:
    """(path, member, absolute data offset) of regular files, descending into nested .tar."""
    for member in tar:
        if not member.isfile():
            continue
        if member.name.lower().endswith(".tar"):
            stem = posixpath.splitext(posixpath.basename(member.name))[0]
            inner = tarfile.open(fileobj=tar.extractfile(member), mode="r:")
            for path, sub, offset in _member_entries(inner, base + member.offset_data):
                yield f"{stem}/{path}", sub, offset
        else:
            yield _clean(member.name), member, base + member.offset_data


class TarSource(ImageSource):
    """An uncompressed tar: members are read by offset, so any order is cheap."""

    def __init__(self, url: str, options: dict[str, Any] | None, shuffle_seed: int | None) -> None:
        super().__init__(redact_url(url))
        fs, path = filesystem(url, options)
        self._file: BinaryIO = fs.open(path, "rb")
        tar = tarfile.open(fileobj=self._file, mode="r:")
        entries = [(p, (offset, m.size)) for p, m, offset in _member_entries(tar, 0)]
        self._index(_strip_common_root(entries), shuffle_seed)

    def read(self, images: Sequence[SourceImage]) -> list[bytes]:
        out = []
        for image in images:
            offset, size = image.locator
            self._file.seek(offset)
            out.append(self._file.read(size))
        return out

    def close(self) -> None:
        self._file.close()


class CompressedTarSource(ImageSource):
    """A compressed tar, read front to back (twice: once to list, once to copy)."""

    def __init__(self, url: str, options: dict[str, Any] | None) -> None:
        super().__init__(redact_url(url))
        self._fs, self._path = filesystem(url, options)
        entries = [(path, n) for n, (path, _) in enumerate(self._stream())]
        self._index(_strip_common_root(entries), shuffle_seed=None)
        self._reader: Iterator[tuple[str, bytes]] | None = None
        self._next = 0
        log.warning("%s is compressed: images keep archive order, so shards are only as mixed "
                    "as the archive; an uncompressed tar or a folder gives shuffled shards",
                    self.description)

    def _stream(self, with_data: bool = False) -> Iterator[tuple[str, bytes]]:
        with self._fs.open(self._path, "rb") as f:
            tar = tarfile.open(fileobj=f, mode="r|*")
            for member in tar:
                if not member.isfile():
                    continue
                data = tar.extractfile(member)
                if member.name.lower().endswith(".tar"):
                    stem = posixpath.splitext(posixpath.basename(member.name))[0]
                    inner = tarfile.open(fileobj=data, mode="r|")
                    for sub in inner:
                        if sub.isfile():
                            content = inner.extractfile(sub).read() if with_data else b""
                            yield f"{stem}/{_clean(sub.name)}", content
                    continue
                yield _clean(member.name), (data.read() if with_data else b"")

    def read(self, images: Sequence[SourceImage]) -> list[bytes]:
        out = []
        for image in images:
            if self._reader is None or image.locator < self._next:
                self._reader, self._next = self._stream(with_data=True), 0
            while True:
                _, data = next(self._reader)
                self._next += 1
                if self._next - 1 == image.locator:
                    out.append(data)
                    break
        return out


class ZipSource(ImageSource):
    def __init__(self, url: str, options: dict[str, Any] | None, shuffle_seed: int | None) -> None:
        super().__init__(redact_url(url))
        fs, path = filesystem(url, options)
        self._file = fs.open(path, "rb")
        self._zip = zipfile.ZipFile(self._file)
        entries = [(info.filename, info.filename) for info in self._zip.infolist()
                   if not info.is_dir()]
        self._index(_strip_common_root(entries), shuffle_seed)

    def read(self, images: Sequence[SourceImage]) -> list[bytes]:
        return [self._zip.read(image.locator) for image in images]

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
                shuffle_seed: int | None = 0) -> ImageSource:
    """The image source at ``src``: a folder, or a .tar/.tar.gz/.tgz/.zip archive."""
    fs, path = filesystem(src, storage_options)
    shown = redact_url(src)
    if not fs.exists(path):
        raise DataError(f"{shown}: source does not exist; expected an image folder "
                        f"(class/xxx.jpg or flat) or a .tar/.tar.gz/.zip archive")
    if fs.isdir(path):
        return FolderSource(src, storage_options, shuffle_seed)
    name = path.lower()
    try:
        if name.endswith(".zip"):
            return ZipSource(src, storage_options, shuffle_seed)
        if name.endswith(".tar"):
            return TarSource(src, storage_options, shuffle_seed)
        if name.endswith(_TAR_SUFFIXES):
            return CompressedTarSource(src, storage_options)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{shown}: cannot read the archive ({type(exc).__name__}: {exc})") from None
    raise DataError(f"{shown}: a file, but not an archive this can read; allowed: "
                    f"{', '.join(_TAR_SUFFIXES)}, .zip, or an image folder")


def read_all(source: ImageSource, start: int) -> Iterator[tuple[SourceImage, bytes]]:
    """Source images from position ``start`` on, with their bytes, read in batches."""
    for begin in range(start, len(source.images), READ_BATCH):
        chunk = source.images[begin:begin + READ_BATCH]
        try:
            data = source.read(chunk)
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            raise DataError(f"{source.description}: cannot read images {chunk[0].key!r}..{chunk[-1].key!r} "
                            f"({describe_error(exc)})") from None
        yield from zip(chunk, data)


