"""The manifest (``manifest.json``) and per-shard index files of a prepared data set.

Layout at the data set root::

    shard-000000.tar          WebDataset shard: {key}.{jpg|png|webp} [+ {key}.cls] members
    shard-000000.index.json   written right after its shard: counts, sha256, sample offsets
    ...
    manifest.json             written last: its presence means the data set is complete

The index files let ``prepare`` resume after the last finished shard and let readers seek to
a sample in the middle of a shard instead of reading up to it.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import asdict, dataclass, field
from typing import Any

from service.data.errors import DataError

MANIFEST_NAME = "manifest.json"
FORMAT = "convmae-webdataset"
VERSION = 1
# Every sample is at least one tar member, and every member starts with a header block: a
# shard's byte count (checked against storage when the data set is opened) bounds its samples.
MIN_SAMPLE_BYTES = tarfile.BLOCKSIZE


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def range_shard_name(number: int, index: int) -> str:
    """Shard ``index`` of range ``number`` of a preparation split into ranges."""
    return f"shard-{number:05d}-{index:06d}.tar"


def index_name(shard: str) -> str:
    """``shard-000003.tar`` -> ``shard-000003.index.json``."""
    return shard.removesuffix(".tar") + ".index.json"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    num_samples: int
    num_bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardIndex:
    """What ``prepare`` records once a shard is fully written."""

    info: ShardInfo
    first_key: str
    last_key: str
    # Byte offset of each sample's first tar member; offsets[i] is where sample i starts.
    offsets: tuple[int, ...]

    def to_json(self) -> str:
        return json.dumps({**asdict(self.info), "first_key": self.first_key,
                           "last_key": self.last_key, "offsets": list(self.offsets)})

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> ShardIndex:
        try:
            raw = json.loads(text)
            info = ShardInfo(name=str(raw["name"]), num_samples=int(raw["num_samples"]),
                             num_bytes=int(raw["num_bytes"]), sha256=str(raw["sha256"]))
            offsets = tuple(int(o) for o in raw["offsets"])
            index = cls(info=info, first_key=str(raw["first_key"]), last_key=str(raw["last_key"]),
                        offsets=offsets)
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{where}: not a valid shard index ({type(exc).__name__}: {exc})") from None
        if len(offsets) != info.num_samples:
            raise DataError(f"{where}: {len(offsets)} offsets for {info.num_samples} samples")
        return index


@dataclass(frozen=True)
class Manifest:
    shards: tuple[ShardInfo, ...]
    # 0 for an unlabeled data set; labels are 0..num_classes-1 (class_names[label] when named).
    num_classes: int = 0
    class_names: tuple[str, ...] = ()
    source: str = ""
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def has_labels(self) -> bool:
        return self.num_classes > 0

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT,
            "version": VERSION,
            "num_samples": self.num_samples,
            "num_shards": self.num_shards,
            "has_labels": self.has_labels,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "source": self.source,
            "created_at": self.created_at,
            "extra": self.extra,
            "shards": [asdict(s) for s in self.shards],
        }, indent=1)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.to_json())

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> Manifest:
        """Parses and checks a manifest; ``where`` (the URL) names it in every error."""
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise DataError(f"{where}: {MANIFEST_NAME} is not valid JSON ({exc}); the data set "
                            f"may be damaged: re-run jobs/prepare_data.py") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise DataError(f"{where}: {MANIFEST_NAME} has format {found!r}; expected {FORMAT!r} "
                            f"(written by jobs/prepare_data.py)")
        if raw.get("version") != VERSION:
            raise DataError(f"{where}: {MANIFEST_NAME} version {raw.get('version')!r} is not "
                            f"supported; this reader knows version {VERSION}")
        try:
            shards = tuple(ShardInfo(name=str(s["name"]), num_samples=int(s["num_samples"]),
                                     num_bytes=int(s["num_bytes"]), sha256=str(s["sha256"]))
                           for s in raw["shards"])
            manifest = cls(shards=shards, num_classes=int(raw.get("num_classes", 0)),
                           class_names=tuple(str(c) for c in raw.get("class_names", ())),
                           source=str(raw.get("source", "")),
                           created_at=str(raw.get("created_at", "")),
                           extra=dict(raw.get("extra", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: {MANIFEST_NAME} is malformed ({type(exc).__name__}: {exc})") from None
        problems = []
        if not shards:
            problems.append("it lists no shards")
        if any(s.num_samples < 1 for s in shards):
            problems.append("a shard has no samples")
        problems += [f"shard {s.name} claims {s.num_samples} samples in {s.num_bytes} bytes, more than the "
                     f"{max(0, s.num_bytes) // MIN_SAMPLE_BYTES} its bytes can hold (a sample takes at least "
                     f"one {MIN_SAMPLE_BYTES}-byte tar block)"
                     for s in shards if s.num_samples > max(0, s.num_bytes) // MIN_SAMPLE_BYTES][:3]
        if "num_samples" in raw and raw["num_samples"] != manifest.num_samples:
            problems.append(f"num_samples={raw['num_samples']} but the shards hold {manifest.num_samples}")
        if any("/" in s.name or s.name.startswith(".") for s in shards):
            problems.append("a shard name is not a plain file name")
        if len({s.name for s in shards}) != len(shards):
            problems.append("a shard is listed twice")
        if manifest.class_names and len(manifest.class_names) != manifest.num_classes:
            problems.append(f"{len(manifest.class_names)} class names for {manifest.num_classes} classes")
        if problems:
            raise DataError(f"{where}: {MANIFEST_NAME} is inconsistent: {'; '.join(problems)}")
        return manifest
