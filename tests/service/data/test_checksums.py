"""Shard checksums: whole-shard reads are checked against the manifest's sha256 as they go."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from service.data import DataError, build_train_loader, open_dataset
from service.data.prepare import prepare_dataset
from service.data.shards import IMAGE_EXTENSIONS, ChecksumReader, iter_samples, split_member_name
from tests.service.data.conftest import config, storage


def damage_an_image(shard: Path, member_number: int = 1) -> None:
    """Flips one byte in the middle of an image member's data: the tar stays well-formed and
    the size unchanged, and the JPEG most likely still decodes (to wrong pixels)."""
    with tarfile.open(shard) as tar:
        images = [m for m in tar.getmembers() if split_member_name(m.name)[1] in IMAGE_EXTENSIONS]
    member = images[member_number]
    at = member.offset_data + member.size // 2
    data = bytearray(shard.read_bytes())
    data[at] ^= 0x55
    shard.write_bytes(bytes(data))


@pytest.fixture
def dataset_dir(tmp_path, make_image_folder) -> Path:
    src = make_image_folder(classes=2, per_class=6)  # 12 images
    dest = tmp_path / "ds"
    prepare_dataset(str(src), str(dest), samples_per_shard=4)  # 3 shards of 4
    return dest


def test_the_reader_hashes_exactly_the_file_while_tarfile_seeks_forward(dataset_dir):
    shard = dataset_dir / "shard-000000.tar"
    with open(shard, "rb") as f:
        reader = ChecksumReader(f)
        keys = [s.key for s in iter_samples(reader, shard.name)]  # type: ignore[arg-type]
        num_bytes, sha256 = reader.finish()
    assert len(keys) == 4 and reader.complete
    assert (num_bytes, sha256) == (shard.stat().st_size, hashlib.sha256(shard.read_bytes()).hexdigest())


def test_a_backward_seek_leaves_the_digest_incomplete_not_wrong(dataset_dir):
    with open(dataset_dir / "shard-000000.tar", "rb") as f:
        reader = ChecksumReader(f)
        reader.read(1000)
        reader.seek(10)
        assert not reader.complete and reader.tell() == 10 and f.tell() == 10


def test_intact_shards_read_whole_pass(dataset_dir):
    dataset = open_dataset(str(dataset_dir))
    assert [len(list(dataset.read(i, 0, 4))) for i in range(3)] == [4, 4, 4]


def test_a_damaged_shard_read_whole_is_an_error_naming_it(dataset_dir):
    damage_an_image(dataset_dir / "shard-000001.tar")
    dataset = open_dataset(str(dataset_dir))
    assert len(list(dataset.read(0, 0, 4))) == 4
    with pytest.raises(DataError, match=r"ds/shard-000001.tar: checksum mismatch") as caught:
        list(dataset.read(1, 0, 4))
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    assert manifest["shards"][1]["sha256"] in str(caught.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_training_stops_on_a_damaged_shard_instead_of_skipping_images(dataset_dir, workers):
    damage_an_image(dataset_dir / "shard-000002.tar", member_number=0)
    loader = build_train_loader(config(url=str(dataset_dir), loader_workers=workers), storage=storage(),
                                img_size=8, batch_size=2, rank=0, world_size=1, seed=0, epoch=0)
    with pytest.raises(DataError, match=r"shard-000002.tar: checksum mismatch"):
        list(loader)


def test_a_manifest_claiming_more_samples_than_its_shard_bytes_hold_is_refused_on_open(dataset_dir):
    # 1e18 samples would reach the workers, whose epoch plans then never end (or run out of memory).
    path = dataset_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][1]["num_samples"] = 10**18
    manifest["num_samples"] = sum(s["num_samples"] for s in manifest["shards"])
    path.write_text(json.dumps(manifest))
    size = (dataset_dir / "shard-000001.tar").stat().st_size
    with pytest.raises(DataError) as caught:
        open_dataset(str(dataset_dir))
    assert (f"shard shard-000001.tar claims {10**18} samples in {size} bytes, more than the {size // 512} "
            "its bytes can hold") in str(caught.value)


def test_partial_reads_are_not_checked(dataset_dir):
    # Checking a read of samples 1..2 would mean reading the rest of the shard; it is left to
    # the whole reads, which every epoch makes of all but a few shards.
    damage_an_image(dataset_dir / "shard-000000.tar", member_number=3)
    dataset = open_dataset(str(dataset_dir))
    assert [s.key for s in dataset.read(0, 1, 3)] == [s.key for s in _stored(dataset_dir / "shard-000000.tar")][1:3]


def _stored(shard: Path):
    return list(iter_samples(io.BytesIO(shard.read_bytes()), shard.name))
