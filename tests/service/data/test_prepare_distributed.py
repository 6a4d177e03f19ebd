"""Distributed preparation on a real local Ray cluster: the same samples as one process, from
a local folder and from S3 (moto), and a range resumed on its own after losing a shard."""

from __future__ import annotations

import fsspec
import pytest

from service.config import ConfigError, PrepareDataConfig, StorageConfig
from service.data.prepare import prepare_dataset
from service.runtime.preparation import prepare_distributed
from tests.service.data.test_prepare import folder_contents, read_everything

SMALL_SHARDS = {"shard_bytes": 8 * 1024}


def test_two_workers_write_the_same_samples_as_one_process(ray_cluster, make_image_folder, tmp_path):
    src = make_image_folder(classes=3, per_class=8)
    single = prepare_dataset(str(src), str(tmp_path / "single"), **SMALL_SHARDS)
    spread = prepare_distributed(str(src), str(tmp_path / "spread"), workers=2, **SMALL_SHARDS)
    assert read_everything(str(tmp_path / "spread")) == read_everything(str(tmp_path / "single"))
    assert (spread["num_samples"], spread["class_names"]) == (single["num_samples"], single["class_names"])
    names = [shard["name"] for shard in spread["shards"]]
    assert {name.split("-")[1] for name in names} == {f"{r:05d}" for r in range(8)}  # 4 ranges per worker
    assert names == sorted(names)


def test_two_workers_from_s3_to_s3(ray_cluster, s3_bucket, make_image_folder, tmp_path):
    src = make_image_folder(classes=2, per_class=6)
    fs = fsspec.filesystem("s3", **_options())
    fs.put(str(src), f"{s3_bucket}/raw", recursive=True)
    prepare_dataset(str(src), str(tmp_path / "single"), **SMALL_SHARDS)
    manifest = prepare_distributed(f"{s3_bucket}/raw", f"{s3_bucket}/shards", workers=2, **SMALL_SHARDS)
    assert manifest["num_samples"] == 12
    assert read_everything(f"{s3_bucket}/shards") == read_everything(str(tmp_path / "single"))


def test_a_rerun_rewrites_only_the_range_that_lost_a_shard(ray_cluster, make_image_folder, tmp_path):
    src = make_image_folder(classes=2, per_class=10)
    out = tmp_path / "out"
    first = prepare_distributed(str(src), str(out), workers=2, **SMALL_SHARDS)
    before = {path.name: path.stat().st_mtime_ns for path in out.glob("shard-*.tar")}
    lost = next(name for name in sorted(before) if name.startswith("shard-00003-"))
    (out / lost).unlink()
    (out / "manifest.json").unlink()  # as after an interrupted run
    second = prepare_distributed(str(src), str(out), workers=2, **SMALL_SHARDS)
    assert second["shards"] == first["shards"]  # byte-identical shards, same checksums
    after = {path.name: path.stat().st_mtime_ns for path in out.glob("shard-*.tar")}
    rewritten = {name for name in after if after[name] != before.get(name)}
    assert lost in rewritten and all(name.startswith("shard-00003-") for name in rewritten)
    assert read_everything(str(out)) == folder_contents(src)  # whole, and checksums hold


def test_cli_workers_and_ray_address(ray_cluster, make_image_folder, tmp_path, capsys):
    # In-process, on the session's cluster (connect_ray joins the one this process has).
    from jobs.prepare_data import main

    src = make_image_folder(classes=2, per_class=3)
    assert main([str(src), str(tmp_path / "out"), "--workers", "2", "--dist.ray_address", "local"]) == 0
    assert "6 images in" in capsys.readouterr().out
    assert read_everything(str(tmp_path / "out")) == folder_contents(src)
    with pytest.raises(SystemExit) as exit_status:
        main([str(src), str(tmp_path / "out2"), "--workers", "-3"])
    assert exit_status.value.code == 2
    assert "workers='-3' is not allowed: a number of processes >= 1, or 0 / auto" in capsys.readouterr().err


def test_workers_setting_is_checked():
    assert PrepareDataConfig(src="a", dest="b").validate().num_workers == 1
    assert PrepareDataConfig(src="a", dest="b", workers="auto").validate().num_workers is None
    assert PrepareDataConfig(src="a", dest="b", workers="0").validate().num_workers is None
    with pytest.raises(ConfigError, match="workers='two' is not allowed"):
        PrepareDataConfig(src="a", dest="b", workers="two").validate()


def _options() -> dict:
    from service.data import storage_options

    return dict(storage_options(StorageConfig()))
