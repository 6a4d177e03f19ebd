"""The data layer against a real S3-compatible server on loopback (moto server mode):
prepare into a bucket, read back with 2 ranks x 2 DataLoader workers."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import fsspec
import pytest
import torch

from service.data import DataError, build_eval_loader, build_train_loader, open_dataset
from service.data.dataset import ShardDataset
from service.data.prepare import prepare_dataset
from service.data.storage import storage_options
from tests.fixtures.s3 import create_bucket
from tests.service.data.conftest import config, image_bytes, storage

WORLD, WORKERS, BATCH = 2, 2, 8
NUM_IMAGES, PER_SHARD = 150, 16
CORRUPT = {"class_1/bad_text": b"this is not an image", "class_2/bad_truncated": None}


def write_folder(root: Path, corrupt: bool) -> Path:
    for n in range(NUM_IMAGES):
        folder = root / f"class_{n % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{n:03d}.jpg").write_bytes(image_bytes(n, size=(24, 20)))
    if corrupt:
        for key, data in CORRUPT.items():
            data = data if data is not None else image_bytes(999, size=(24, 20))[:200]
            (root / f"{key}.jpg").write_bytes(data)
    return root


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    return create_bucket(s3_server, prefix="data")


@pytest.fixture(scope="module")
def clean_url(bucket, tmp_path_factory) -> str:
    src = write_folder(tmp_path_factory.mktemp("clean"), corrupt=False)
    url = f"{bucket}/clean"
    prepare_dataset(str(src), url, storage_options=storage_options(storage()),
                    samples_per_shard=PER_SHARD)
    return url


@pytest.fixture(scope="module")
def corrupt_url(bucket, tmp_path_factory) -> str:
    src = write_folder(tmp_path_factory.mktemp("corrupt"), corrupt=True)
    url = f"{bucket}/corrupt"
    prepare_dataset(str(src), url, storage_options=storage_options(storage()),
                    samples_per_shard=PER_SHARD)
    return url


def all_keys(url: str) -> set[str]:
    dataset = open_dataset(url, storage())
    return {s.key for shard, n in enumerate(dataset.shard_sizes) for s in dataset.read(shard, 0, n)}


def train_loader(url: str, rank: int, epoch: int = 0, workers: int = WORKERS, **kwargs):
    return build_train_loader(config(url=url, loader_workers=workers, shuffle_buffer=12), storage=storage(),
                              img_size=16, batch_size=BATCH, rank=rank, world_size=WORLD,
                              seed=7, epoch=epoch, **kwargs)


def test_prepared_bucket_holds_shards_indexes_and_manifest(clean_url):
    fs = fsspec.filesystem("s3", **storage_options(storage()))
    names = [p.rsplit("/", 1)[1] for p in fs.ls(clean_url)]
    assert "manifest.json" in names
    assert sum(n.endswith(".tar") for n in names) == -(-NUM_IMAGES // PER_SHARD)
    assert sum(n.endswith(".index.json") for n in names) == -(-NUM_IMAGES // PER_SHARD)
    dataset = open_dataset(clean_url, storage())
    assert (dataset.num_samples, dataset.num_classes, dataset.has_labels) == (NUM_IMAGES, 3, True)


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(clean_url):
    everything = all_keys(clean_url)
    dropped_per_epoch = []
    for epoch in range(2):
        loaders = [train_loader(clean_url, rank, epoch) for rank in range(WORLD)]
        assert len(loaders[0]) == len(loaders[1]) == NUM_IMAGES // WORLD // BATCH
        seen: list[str] = []
        for loader in loaders:
            batches = list(loader)
            assert len(batches) == len(loader)
            for batch in batches:
                assert batch["images"].shape == (BATCH, 3, 16, 16)
                assert batch["images"].dtype == torch.float32
                assert batch["labels"].dtype == torch.long and batch["labels"].shape == (BATCH,)
                assert set(batch["labels"].tolist()) <= {0, 1, 2}
                assert len(batch["keys"]) == BATCH
                seen.extend(batch["keys"])
        counts = Counter(seen)
        assert max(counts.values()) == 1, "a sample was read twice in one epoch"
        assert set(seen) <= everything
        assert len(seen) == WORLD * len(loaders[0]) * BATCH
        dropped_per_epoch.append(everything - set(seen))
    assert dropped_per_epoch[0] != dropped_per_epoch[1]


def test_labels_match_the_class_folders(clean_url):
    for batch in train_loader(clean_url, rank=0, workers=0):
        for key, label in zip(batch["keys"], batch["labels"].tolist()):
            assert key.startswith(f"class_{label}/")


@pytest.mark.parametrize("stop_after", [1, 3])
def test_resuming_mid_epoch_yields_exactly_the_remaining_batches(clean_url, stop_after):
    reference = list(train_loader(clean_url, rank=1, epoch=3))
    interrupted = train_loader(clean_url, rank=1, epoch=3)
    for n, _ in enumerate(interrupted, start=1):
        if n == stop_after:
            break
    state = json.loads(json.dumps(interrupted.state_dict()))
    assert state["batches_consumed"] == stop_after and state["epoch"] == 3
    resumed = train_loader(clean_url, rank=1, epoch=3, resume_state=state)
    assert len(resumed) == len(reference) and resumed.batches_remaining == len(reference) - stop_after
    rest = list(resumed)
    assert len(rest) == len(reference) - stop_after
    for got, want in zip(rest, reference[stop_after:]):
        assert got["keys"] == want["keys"]
        assert torch.equal(got["images"], want["images"])
        assert torch.equal(got["labels"], want["labels"])
    assert resumed.state_dict()["batches_consumed"] == len(reference)


def test_rank_zeros_state_resumes_the_other_rank_too(clean_url):
    reference = list(train_loader(clean_url, rank=1, epoch=0, workers=0))
    rank0 = train_loader(clean_url, rank=0, epoch=0, workers=0)
    next(iter(rank0))
    rest = list(train_loader(clean_url, rank=1, epoch=0, workers=0, resume_state=rank0.state_dict()))
    assert [b["keys"] for b in rest] == [b["keys"] for b in reference[1:]]


def test_resume_state_for_other_settings_is_refused(clean_url):
    state = train_loader(clean_url, rank=0, epoch=2).state_dict()
    with pytest.raises(DataError, match="epoch: saved 2, now 3"):
        train_loader(clean_url, rank=0, epoch=3, resume_state=state)
    with pytest.raises(DataError, match="num_streams: saved 2, now 1"):
        train_loader(clean_url, rank=0, epoch=2, workers=0, resume_state=state)
    with pytest.raises(DataError, match="not a train loader state"):
        train_loader(clean_url, rank=0, epoch=2, resume_state={"batches": 3})


def test_corrupt_images_are_skipped_counted_and_logged(corrupt_url, caplog):
    total_corrupt, seen = 0, []
    with caplog.at_level(logging.WARNING, logger="service.data"):
        for rank in range(WORLD):
            loader = train_loader(corrupt_url, rank)
            batches = list(loader)
            assert len(batches) == len(loader) == (NUM_IMAGES + len(CORRUPT)) // WORLD // BATCH
            assert all(b["images"].shape == (BATCH, 3, 16, 16) for b in batches)
            seen.extend(k for b in batches for k in b["keys"])
            total_corrupt += loader.corrupt_samples
    dealt_bad = set(CORRUPT) & _dealt(corrupt_url)  # the others fell in the dropped remainder
    assert dealt_bad, "the test needs a corrupt image among this epoch's samples"
    logged = {key for key in CORRUPT if f"skipped image {key!r}" in caplog.text}
    assert total_corrupt == len(dealt_bad) and logged == dealt_bad
    assert not set(seen) & set(CORRUPT)  # their slots were filled with decodable images


def _dealt(url: str) -> set[str]:
    """Keys that the epoch-0 plans hand to some rank (the rest are this epoch's remainder)."""
    keys: set[str] = set()
    for rank in range(WORLD):
        loader = train_loader(url, rank)
        plan, dataset = loader.plan, loader.dataset
        for stream in range(plan.num_streams):
            for seg in plan.segments(*plan.stream_span(stream)):
                keys |= {s.key for s in dataset.read(seg.shard, seg.start, seg.stop)}
    return keys


def test_eval_loader_reads_every_sample_once_across_ranks_in_a_fixed_order(clean_url):
    cfg = config(loader_workers=WORKERS)
    runs = [[b["keys"] for b in build_eval_loader(clean_url, cfg, storage=storage(), img_size=16, batch_size=BATCH,
                                                  rank=r, world_size=WORLD)]
            for r in range(WORLD)]
    seen = [k for run in runs for keys in run for k in keys]
    assert sorted(seen) == sorted(all_keys(clean_url))
    again = [b["keys"] for b in build_eval_loader(clean_url, cfg, storage=storage(), img_size=16, batch_size=BATCH,
                                                  rank=0, world_size=WORLD)]
    assert again == runs[0]


def test_a_transient_read_error_is_retried_without_losing_or_repeating_samples(
        clean_url, monkeypatch, caplog):
    real = ShardDataset._read_once
    failures = []

    def flaky(self, shard, start, stop):
        for n, sample in enumerate(real(self, shard, start, stop)):
            if shard == 1 and n == 3 and not failures:
                failures.append(start + n)
                raise ConnectionResetError("connection reset by peer")
            yield sample

    monkeypatch.setattr(ShardDataset, "_read_once", flaky)
    monkeypatch.setattr(ShardDataset, "__init__", _no_sleep(ShardDataset.__init__))
    with caplog.at_level(logging.WARNING, logger="service.data"):
        keys = [k for b in build_eval_loader(clean_url, config(), storage=storage(), img_size=16, batch_size=BATCH)
                for k in b["keys"]]
    assert failures and "retry 1/2" in caplog.text and "connection reset" in caplog.text
    assert sorted(keys) == sorted(all_keys(clean_url))


def _no_sleep(init):
    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.sleep = lambda seconds: None
    return patched


def test_missing_bucket_prefix_and_manifest_fail_up_front(s3_bucket, clean_url):
    cfg = storage()
    with pytest.raises(DataError, match=r"s3://no-such-bucket-x/data.*bucket 'no-such-bucket-x' does not exist"):
        open_dataset("s3://no-such-bucket-x/data", cfg)
    with pytest.raises(DataError, match=rf"{s3_bucket}/missing: no such prefix"):
        open_dataset(f"{s3_bucket}/missing", cfg)
    fs = fsspec.filesystem("s3", **storage_options(cfg))
    fs.pipe_file(f"{s3_bucket}/half/shard-000000.tar", b"\0" * 1024)
    with pytest.raises(DataError, match="incomplete data set"):
        open_dataset(f"{s3_bucket}/half", cfg)
    fs.pipe_file(f"{s3_bucket}/raw/cat.jpg", image_bytes(0))
    with pytest.raises(DataError, match="not a prepared data set"):
        open_dataset(f"{s3_bucket}/raw", cfg)
    fs.pipe_file(f"{s3_bucket}/broken/manifest.json", b"{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        open_dataset(f"{s3_bucket}/broken", cfg)
    manifest = json.loads(fs.cat_file(f"{clean_url}/manifest.json"))
    manifest["shards"].append({**manifest["shards"][0], "name": "shard-999999.tar"})
    manifest["num_samples"] += manifest["shards"][0]["num_samples"]
    fs.pipe_file(f"{s3_bucket}/lost/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(DataError, match="shard-000000.tar is in manifest.json but not in storage"):
        open_dataset(f"{s3_bucket}/lost", cfg)


def test_prepare_cli_style_options_reach_the_bucket(s3_bucket, s3_server, make_image_folder,
                                                    monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the explicit endpoint can find the server
    src = make_image_folder(classes=2, per_class=3)
    options = storage_options(storage(endpoint_url=s3_server))
    manifest = prepare_dataset(str(src), f"{s3_bucket}/cli", storage_options=options)
    assert manifest["num_samples"] == 6
    dataset = open_dataset(f"{s3_bucket}/cli", storage(endpoint_url=s3_server))
    assert dataset.num_samples == 6
