"""The manifest and shard index files of a prepared data set: what is written reads back, and a
damaged or foreign file is refused naming the file and what is wrong."""

from __future__ import annotations

import json

import pytest

from service.data.errors import DataError
from service.data.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardIndex,
    ShardInfo,
    index_name,
    shard_name,
)

WHERE = "s3://bucket/digits/train"
SHARDS = (ShardInfo("shard-000000.tar", 3, 3072, "a" * 64), ShardInfo("shard-000001.tar", 2, 2048, "b" * 64))


def test_shard_and_index_file_names():
    assert shard_name(0) == "shard-000000.tar" and shard_name(1234) == "shard-001234.tar"
    assert index_name("shard-000003.tar") == "shard-000003.index.json"


def test_a_manifest_reads_back_what_was_written():
    written = Manifest(shards=SHARDS, num_classes=2, class_names=("cat", "dog"), source="/data/pets",
                       created_at="2026-01-01T00:00:00+00:00", extra={"shard_size": 3})
    raw = json.loads(written.to_json())
    assert raw["format"] == "convmae-webdataset" and raw["version"] == 1
    assert (raw["num_samples"], raw["num_shards"], raw["has_labels"]) == (5, 2, True)
    assert Manifest.from_json(written.to_json(), WHERE) == written
    assert written.to_dict() == raw
    unlabeled = Manifest(shards=SHARDS[:1])
    assert not unlabeled.has_labels and Manifest.from_json(unlabeled.to_json(), WHERE).num_samples == 3


def manifest_with(**changes) -> str:
    raw = json.loads(Manifest(shards=SHARDS, num_classes=2, class_names=("cat", "dog")).to_json())
    raw.update(changes)
    return json.dumps(raw)


@pytest.mark.parametrize("text,problem", [
    ("{not json", f"{MANIFEST_NAME} is not valid JSON"),
    ("[1, 2]", f"{MANIFEST_NAME} has format 'list'; expected 'convmae-webdataset'"),
    (manifest_with(format="webdataset"), f"{MANIFEST_NAME} has format 'webdataset'; expected 'convmae-webdataset'"),
    (manifest_with(version=2), f"{MANIFEST_NAME} version 2 is not supported; this reader knows version 1"),
    (manifest_with(shards=[{"name": "shard-000000.tar"}]), f"{MANIFEST_NAME} is malformed (KeyError: 'num_samples')"),
    (manifest_with(num_classes="two"), f"{MANIFEST_NAME} is malformed (ValueError"),
    (manifest_with(shards=[]), "is inconsistent: it lists no shards"),
    (manifest_with(shards=[{**vars(SHARDS[0]), "num_samples": 0}]), "is inconsistent: a shard has no samples"),
    (manifest_with(num_samples=6), "is inconsistent: num_samples=6 but the shards hold 5"),
    (manifest_with(shards=[{**vars(SHARDS[0]), "name": "../x.tar"}]), "a shard name is not a plain file name"),
    (manifest_with(shards=[vars(SHARDS[0]), vars(SHARDS[0])]), "a shard is listed twice"),
    (manifest_with(class_names=["cat"]), "is inconsistent: 1 class names for 2 classes"),
])
def test_a_damaged_or_foreign_manifest_is_refused_naming_it(text, problem):
    with pytest.raises(DataError) as refused:
        Manifest.from_json(text, WHERE)
    assert str(refused.value).startswith(f"{WHERE}: ")
    assert problem in str(refused.value)


def test_a_shard_index_reads_back_and_must_have_one_offset_per_sample():
    index = ShardIndex(info=SHARDS[0], first_key="000000", last_key="000002", offsets=(0, 1024, 2048))
    assert ShardIndex.from_json(index.to_json(), "idx") == index
    raw = json.loads(index.to_json())
    where = f"{WHERE}/{index_name(SHARDS[0].name)}"
    with pytest.raises(DataError, match=rf"^{where}: 2 offsets for 3 samples$"):
        ShardIndex.from_json(json.dumps({**raw, "offsets": [0, 1024]}), where)
    with pytest.raises(DataError, match=rf"^{where}: not a valid shard index \(KeyError: 'offsets'\)$"):
        ShardIndex.from_json(json.dumps({k: v for k, v in raw.items() if k != "offsets"}), where)
    with pytest.raises(DataError, match=rf"^{where}: not a valid shard index \(ValueError"):
        ShardIndex.from_json(json.dumps({**raw, "offsets": [0, "x", 2]}), where)
