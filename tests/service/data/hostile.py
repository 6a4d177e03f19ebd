"""Hostile inputs for preparation and loading, made on the spot: JPEGs of many scans or cut
short, tars nested deep, and data sets written without preparation's checks."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from PIL import Image

from service.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, shard_name
from service.data.shards import ShardWriter
from tests.service.data.conftest import image_bytes


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a JPEG, a scan's entropy-coded data included."""
    position, out = 2, []
    while position < len(data):
        marker = data[position + 1]
        if marker == 0xD9:
            out.append((marker, position, position + 2))
            return out
        end = position + 2 + int.from_bytes(data[position + 2:position + 4], "big")
        if marker == 0xDA:  # the scan's data runs to the next marker that is not a restart
            while True:
                end = data.index(b"\xff", end)
                if data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                    end += 2
                    continue
                break
        out.append((marker, position, end))
        position = end
    return out


def many_scans_jpeg(scans: int, seed: int = 0) -> bytes:
    """A valid-looking progressive JPEG whose last scan is repeated to make ``scans`` scans in
    all: libjpeg decodes every one of them (with a warning), each a pass over the image."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(image_bytes(seed))).save(buffer, format="JPEG", progressive=True)
    data = buffer.getvalue()
    segments = jpeg_segments(data)
    sos = [(start, end) for marker, start, end in segments if marker == 0xDA]
    last_start, last_end = sos[-1]
    repeats = scans - len(sos) + 1
    return data[:last_start] + data[last_start:last_end] * repeats + b"\xff\xd9"


def cut_jpeg(seed: int = 0, keep_end_marker: bool = False) -> bytes:
    """A JPEG whose data stops halfway through its scan; with ``keep_end_marker`` the EOI is
    put back after the cut (the header still promises the whole image)."""
    data = image_bytes(seed, (64, 48))
    cut = data[:len(data) // 2]
    return cut + b"\xff\xd9" if keep_end_marker else cut


def nested_tar(depth: int, inner_name: str = "deep.jpg") -> bytes:
    """A tar holding a tar holding a tar... ``depth`` levels, an image at the bottom. Built by
    hand (headers and padding only) so that 1000 levels stay ~1 MB."""
    def member(name: str, data: bytes) -> bytes:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        padding = -len(data) % tarfile.BLOCKSIZE
        return info.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * padding

    blob = member(inner_name, image_bytes(99))
    for level in range(depth):
        blob = member(f"level{level}.tar", blob)
    return blob


def write_unchecked_dataset(dest: Path, items: list[tuple[str, str, bytes, int]], num_classes: int = 1,
                            samples_per_shard: int | None = None) -> str:
    """A data set of (key, ext, bytes, label) written as they are, in order (no preparation,
    so none of its refusals): what an older preparation or another tool may have made."""
    dest.mkdir(parents=True, exist_ok=True)
    per_shard = samples_per_shard or len(items)
    shards = []
    for number, begin in enumerate(range(0, len(items), per_shard)):
        writer = ShardWriter(str(dest / shard_name(number)))
        for key, ext, data, label in items[begin:begin + per_shard]:
            writer.add(key, ext, data, label)
        num_bytes, sha256 = writer.close()
        shards.append(ShardInfo(shard_name(number), writer.num_samples, num_bytes, sha256))
    manifest = Manifest(shards=tuple(shards), num_classes=num_classes)
    (dest / MANIFEST_NAME).write_text(manifest.to_json())
    return str(dest)
