"""WebDataset tar shards: writing them (with sample offsets) and streaming samples out of them.

A sample is the run of consecutive tar members sharing a key: ``{key}.{ext}`` where the key is
everything before the first dot of the file name (directories included), as WebDataset does.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

# Extensions read as the sample's image, in order of preference when a sample has several.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTENSION = "cls"
_BLOCK = tarfile.BLOCKSIZE
# Fixed member metadata keeps shards byte-identical across runs, so checksums are reproducible.
_MTIME = 0
_MODE = 0o444


@dataclass(frozen=True, slots=True)
class RawSample:
    """One sample as stored: undecoded image bytes (None when the sample has no image)."""

    key: str
    image: bytes | None
    label: int  # -1 when the sample has no (readable) .cls member
    shard: str


def split_member_name(name: str) -> tuple[str, str]:
    """``a/b/x.seg.png`` -> (``a/b/x``, ``seg.png``): key up to the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def sanitize_key(path_without_extension: str) -> str:
    """A WebDataset-safe key: no dots in the file name part, no leading ``./`` or ``/``."""
    directory, _, stem = path_without_extension.strip("/").rpartition("/")
    while directory.startswith("./"):
        directory = directory[2:]
    stem = stem.replace(".", "_") or "_"
    return f"{directory}/{stem}" if directory else stem


def sample_tar_bytes(image_bytes: int, labeled: bool) -> int:
    """Bytes a sample adds to a shard: a header block per member plus block-padded data."""
    data_blocks = -(-image_bytes // _BLOCK)
    return (1 + data_blocks) * _BLOCK + (2 * _BLOCK if labeled else 0)


class ShardWriter:
    """Writes one shard to a local file and records where each sample starts."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self.offsets: list[int] = []
        self.first_key = ""
        self.last_key = ""

    @property
    def num_samples(self) -> int:
        return len(self.offsets)

    def size_with(self, sample_bytes: int) -> int:
        """The finished file's size if a sample of ``sample_bytes`` were added: tar ends with
        two zero blocks and is padded to a whole record."""
        end = self._tar.offset + sample_bytes + 2 * _BLOCK
        return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE

    def add(self, key: str, ext: str, image: bytes, label: int = -1) -> None:
        if not self.offsets:
            self.first_key = key
        self.last_key = key
        self.offsets.append(self._tar.offset)
        self._add_member(f"{key}.{ext}", image)
        if label >= 0:
            self._add_member(f"{key}.{LABEL_EXTENSION}", str(label).encode())

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), _MTIME, _MODE
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> tuple[int, str]:
        """Finishes the file; returns (size in bytes, sha256 hex digest)."""
        self._tar.close()
        self._file.close()
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            while chunk := f.read(4 * 2**20):
                digest.update(chunk)
        with open(self.path, "rb") as f:
            size = f.seek(0, io.SEEK_END)
        return size, digest.hexdigest()


class ChecksumReader:
    """A forward-only view of a binary file that hashes (sha256) every byte read through it.

    ``tarfile`` only ever seeks forward over a shard it reads in order (over padding and
    members it skips), so those seeks are done by reading, and the digest covers the bytes
    from where the reader started. A backward seek leaves the digest incomplete
    (``complete`` False) rather than wrong.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.position = 0
        self.complete = True
        self._digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self._digest.update(data)
        self.position += len(data)
        return data

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self.position + offset}.get(whence)
        if target is None or target < self.position:
            self.complete = False
            self.position = self.raw.seek(offset, whence)
            return self.position
        while self.position < target:
            if not self.read(min(target - self.position, 2**20)):
                break
        return self.position

    def finish(self) -> tuple[int, str]:
        """Reads (and hashes) the rest of the file; returns (bytes read, sha256 hex digest)."""
        while self.read(2**20):
            pass
        return self.position, self._digest.hexdigest()


def iter_samples(fileobj: BinaryIO, shard: str, limit: int | None = None) -> Iterator[RawSample]:
    """Samples from a seekable shard file positioned at a sample boundary, at most ``limit``."""
    if limit is not None and limit <= 0:
        return
    tar = tarfile.open(fileobj=fileobj, mode="r:")
    count = 0
    key: str | None = None
    parts: dict[str, bytes] = {}
    for member in tar:
        if not member.isfile():
            continue
        member_key, ext = split_member_name(member.name)
        if member_key != key:
            if key is not None:
                yield _sample(key, parts, shard)
                count += 1
                if limit is not None and count >= limit:
                    return
            key, parts = member_key, {}
        if ext in IMAGE_EXTENSIONS or ext == LABEL_EXTENSION:
            parts[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    if key is not None:
        yield _sample(key, parts, shard)


def _sample(key: str, parts: dict[str, bytes], shard: str) -> RawSample:
    image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
    label = -1
    if LABEL_EXTENSION in parts:
        try:
            label = int(parts[LABEL_EXTENSION].decode("ascii").strip())
        except ValueError:
            label = -1
    return RawSample(key=key, image=image, label=label, shard=shard)
