"""The embedded digits data set: generated once, split stratified, race-safe, reused."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from service.config import DataConfig
from service.data import DataError, build_eval_loader, embedded, open_dataset, resolve_data_urls
from service.data.embedded import ensure_digits
from tests.service.data.conftest import config, storage


def labels_of(url: str) -> Counter:
    dataset = open_dataset(url, storage())
    return Counter(s.label for shard, n in enumerate(dataset.shard_sizes)
                   for s in dataset.read(shard, 0, n))


def test_empty_url_resolves_to_the_embedded_splits(embedded_dir):
    train, val = resolve_data_urls(DataConfig(embedded_dir=str(embedded_dir)))
    assert Path(train) == embedded_dir / "digits" / "train"
    assert Path(val) == embedded_dir / "digits" / "val"
    a, b = open_dataset(train, storage()), open_dataset(val, storage())
    assert (a.num_samples, b.num_samples) == (1617, 180)
    assert a.num_classes == b.num_classes == 10 and a.has_labels
    assert a.class_names == tuple(str(d) for d in range(10))
    assert a.num_shards > 8  # small shards, so several ranks x workers get whole shards


def test_given_urls_are_used_as_they_are():
    assert resolve_data_urls(DataConfig(url="s3://b/train", val_url="s3://b/val")) == (
        "s3://b/train", "s3://b/val")
    assert resolve_data_urls(DataConfig(url="s3://b/train")) == ("s3://b/train", None)


def test_split_is_stratified_and_disjoint(digits_train, digits_val):
    train, val = labels_of(digits_train), labels_of(digits_val)
    assert set(train) == set(val) == set(range(10))
    for digit in range(10):
        share = val[digit] / (val[digit] + train[digit])
        assert 0.08 < share < 0.12
    keys = [
        {s.key for shard, n in enumerate(d.shard_sizes) for s in d.read(shard, 0, n)}
        for d in (open_dataset(digits_train, storage()), open_dataset(digits_val, storage()))
    ]
    assert not keys[0] & keys[1]


def test_images_are_real_digits_at_32px(digits_val):
    loader = build_eval_loader(digits_val, config(), storage=storage(), img_size=32, batch_size=64)
    batch = next(iter(loader))
    assert batch["images"].shape == (64, 3, 32, 32)
    images = batch["images"]
    # Digit strokes are bright on a dark background and identical in all three channels.
    assert images.amax() > 1.5 and images.amin() < -1.5
    assert (images[:, 0] * 0.229 + 0.485 - images[:, 1] * 0.224 - 0.456).abs().max() < 1e-5


def test_generated_once_then_reused(embedded_dir):
    manifest = embedded_dir / "digits" / "train" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert ensure_digits(embedded_dir) == embedded_dir / "digits"
    assert manifest.stat().st_mtime_ns == stamp


def test_losing_a_first_use_race_keeps_the_winners_copy(tmp_path, monkeypatch):
    """Another process finishes while this one is still writing its own copy: the rename
    fails, the winner's copy is used and the loser's temporary directory disappears."""
    real_write = embedded._write_digits
    calls = []

    def write_while_another_process_wins(root):
        calls.append(root)
        if len(calls) == 1:
            ensure_digits(tmp_path)  # the other process, start to finish
        real_write(root)

    monkeypatch.setattr(embedded, "_write_digits", write_while_another_process_wins)
    assert ensure_digits(tmp_path) == tmp_path / "digits"
    assert len(calls) == 2 and not calls[0].exists()
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]  # no temporary leftovers
    assert open_dataset(str(tmp_path / "digits" / "train"), storage()).num_samples == 1617


def test_a_broken_embedded_directory_is_reported_not_used(tmp_path):
    (tmp_path / "digits" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="not a complete embedded data set"):
        ensure_digits(tmp_path)
