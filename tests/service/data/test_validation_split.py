"""The validation split jobs/prepare_data.py holds out (val_fraction): drawn by key, disjoint
from training, whole together, the same on resume and over workers; resolve_data_urls uses it
when data.val_url is empty."""

from __future__ import annotations

import json
import logging

import pytest

from service.config import ConfigError, DataConfig, PrepareDataConfig
from service.data import DataError, open_dataset, resolve_data_urls
from service.data.prepare import is_held_out, prepare_dataset
from tests.service.data.conftest import storage
from tests.service.data.test_prepare import folder_contents, read_everything

FRACTION = 0.2


def test_the_split_is_disjoint_whole_and_near_the_fraction(make_image_folder, tmp_path):
    src = make_image_folder(classes=4, per_class=25)
    dest = tmp_path / "out"
    manifest = prepare_dataset(str(src), str(dest), val_fraction=FRACTION, samples_per_shard=16)
    train, val = read_everything(str(dest)), read_everything(str(dest / "val"))
    assert not set(train) & set(val)
    assert {**train, **val} == folder_contents(src)  # every image once, bytes and labels intact
    # 100 keys drawn at 0.2: the count is binomial (sd 4); 5..35 is ~4 sd either side.
    assert 5 <= len(val) <= 35
    assert all(is_held_out(key, FRACTION) for key in val)
    assert not any(is_held_out(key, FRACTION) for key in train)
    assert manifest["extra"]["val_images"] == len(val) and manifest["num_samples"] == len(train)
    val_set = open_dataset(str(dest / "val"), storage())
    assert (val_set.has_labels, val_set.class_names) == (True, tuple(manifest["class_names"]))
    val_extra = json.loads((dest / "val" / "manifest.json").read_text())["extra"]
    assert (val_extra["split"], val_extra["val_fraction"]) == ("val", FRACTION)


def test_the_draw_is_by_key_not_order_or_seed(make_image_folder, tmp_path):
    src = make_image_folder(classes=2, per_class=20)
    prepare_dataset(str(src), str(tmp_path / "a"), val_fraction=FRACTION, shuffle_seed=1)
    prepare_dataset(str(src), str(tmp_path / "b"), val_fraction=FRACTION, shuffle_seed=None)
    assert read_everything(str(tmp_path / "a" / "val")) == read_everything(str(tmp_path / "b" / "val"))


def test_unlabeled_sources_are_split_too(make_image_folder, tmp_path):
    src = make_image_folder(classes=0, per_class=40)
    prepare_dataset(str(src), str(tmp_path / "out"), val_fraction=FRACTION)
    val = open_dataset(str(tmp_path / "out" / "val"), storage())
    assert val.num_samples > 0 and not val.has_labels  # val/recon_loss needs no labels


def test_no_split_by_default_and_when_the_draw_is_empty(make_image_folder, tmp_path, caplog):
    src = make_image_folder(classes=1, per_class=3)
    prepare_dataset(str(src), str(tmp_path / "off"))
    assert not (tmp_path / "off" / "val").exists()
    tiny = min(is_held_out_at(f"class_0/img_0_{i}") for i in range(3)) / 2  # below every key's draw
    with caplog.at_level(logging.WARNING):
        manifest = prepare_dataset(str(src), str(tmp_path / "tiny"), val_fraction=tiny)
    assert manifest["num_samples"] == 3 and not (tmp_path / "tiny" / "val").exists()
    assert "no validation split held out" in caplog.text


def is_held_out_at(key: str) -> float:
    """The smallest fraction that holds ``key`` out (its draw, as a fraction)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (low, middle) if is_held_out(key, middle) else (middle, high)
    return high


def test_a_rerun_resumes_both_splits_and_another_fraction_is_refused(make_image_folder, tmp_path):
    src = make_image_folder(classes=2, per_class=20)
    dest = tmp_path / "out"
    first = prepare_dataset(str(src), str(dest), val_fraction=FRACTION, samples_per_shard=4)
    val_first = (dest / "val" / "manifest.json").read_bytes()
    (dest / "manifest.json").unlink()  # as if interrupted after the split
    (dest / first["shards"][-1]["name"]).unlink()
    again = prepare_dataset(str(src), str(dest), val_fraction=FRACTION, samples_per_shard=4)
    assert again["shards"] == first["shards"]
    assert (dest / "val" / "manifest.json").read_bytes() == val_first  # left alone, not rewritten
    with pytest.raises(DataError, match=r"prepared with val_fraction=0.2, not 0.1; rerun with --val_fraction 0.2"):
        prepare_dataset(str(src), str(dest), val_fraction=0.1)
    prepare_dataset(str(src), str(tmp_path / "unsplit"))  # as before there were splits
    with pytest.raises(DataError, match=r"val_fraction=0, not 0.2"):
        prepare_dataset(str(src), str(tmp_path / "unsplit"), val_fraction=FRACTION)
    assert not (tmp_path / "unsplit" / "val").exists()


def test_overwrite_without_a_split_removes_the_old_one(make_image_folder, tmp_path):
    src = make_image_folder(classes=2, per_class=10)
    dest = tmp_path / "out"
    prepare_dataset(str(src), str(dest), val_fraction=FRACTION)
    whole = prepare_dataset(str(src), str(dest), overwrite=True)
    assert whole["num_samples"] == 20
    assert not (dest / "val" / "manifest.json").exists()  # it would overlap the training images
    assert resolve_data_urls(DataConfig(url=str(dest))) == (str(dest), None)


def test_resolve_uses_the_held_out_split_when_val_url_is_empty(make_image_folder, tmp_path, caplog):
    src = make_image_folder(classes=2, per_class=10)
    dest = tmp_path / "out"
    prepare_dataset(str(src), str(dest), val_fraction=FRACTION)
    with caplog.at_level(logging.INFO, logger="service.data.embedded"):
        assert resolve_data_urls(DataConfig(url=str(dest) + "/")) == (str(dest) + "/", f"{dest}/val")
    assert f"validating on {dest}/val" in caplog.text
    assert resolve_data_urls(DataConfig(url=str(dest), val_url="s3://b/mine")) == (str(dest), "s3://b/mine")
    assert resolve_data_urls(DataConfig(url=str(tmp_path / "unprepared"))) == (str(tmp_path / "unprepared"), None)


def test_resolve_finds_the_split_on_s3(s3_bucket, make_image_folder):
    from service.data import storage_options

    src = make_image_folder(classes=2, per_class=10)
    prepare_dataset(str(src), f"{s3_bucket}/ds", val_fraction=FRACTION, storage_options=storage_options(storage()))
    assert resolve_data_urls(DataConfig(url=f"{s3_bucket}/ds"), storage()) == (f"{s3_bucket}/ds", f"{s3_bucket}/ds/val")


def test_val_fraction_is_checked():
    assert PrepareDataConfig(src="a", dest="b").validate().val_fraction == 0.05
    with pytest.raises(ConfigError, match=r"val_fraction=0.7 is not allowed: from 0 \(no validation split\) to 0.5"):
        PrepareDataConfig(src="a", dest="b", val_fraction=0.7).validate()
