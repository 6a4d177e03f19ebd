"""prepare_dataset / jobs/prepare_data.py: layouts, archives, shard sizes, manifest last, resume;
symlinks that leave the source, missing buckets and unreachable storage."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import boto3
import pytest
from PIL import Image

import service.data.prepare as prepare_module
from service.config import StorageConfig
from service.data import DataError, open_dataset, storage_options
from service.data.prepare import prepare_dataset
from tests.service.data.conftest import image_bytes, storage

REPO = Path(__file__).resolve().parents[3]


def read_everything(url: str) -> dict[str, tuple[bytes, int]]:
    dataset = open_dataset(url, storage())
    out = {}
    for shard, size in enumerate(dataset.shard_sizes):
        for sample in dataset.read(shard, 0, size):
            out[sample.key] = (sample.image, sample.label)
    return out


def folder_contents(root: Path) -> dict[str, tuple[bytes, int]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    out = {}
    for path in root.rglob("*.*"):
        rel = path.relative_to(root)
        label = classes.index(rel.parts[0]) if len(rel.parts) > 1 else -1
        out[str(rel.with_suffix(""))] = (path.read_bytes(), label)
    return out


def test_labeled_folder_round_trips_bytes_labels_and_keys(make_image_folder, tmp_path):
    src = make_image_folder(classes=3, per_class=7)
    manifest = prepare_dataset(str(src), str(tmp_path / "out"), shard_bytes=16 * 1024)
    assert manifest["num_samples"] == 21 and manifest["num_classes"] == 3
    assert manifest["class_names"] == ["class_0", "class_1", "class_2"]
    assert manifest["num_shards"] > 1
    assert sum(s["num_samples"] for s in manifest["shards"]) == 21
    assert read_everything(str(tmp_path / "out")) == folder_contents(src)
    dataset = open_dataset(str(tmp_path / "out"), storage())
    assert (dataset.num_samples, dataset.has_labels, dataset.num_classes) == (21, True, 3)


def test_shards_are_plain_webdataset_tars_with_checksums(make_image_folder, tmp_path):
    src = make_image_folder(classes=2, per_class=3)
    manifest = prepare_dataset(str(src), str(tmp_path / "out"))
    shard = manifest["shards"][0]
    path = tmp_path / "out" / shard["name"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
    assert path.stat().st_size == shard["num_bytes"]
    with tarfile.open(path) as tar:
        names = tar.getnames()
    assert len(names) == 12
    assert {n.rsplit(".", 1)[1] for n in names} == {"jpg", "cls"}
    assert all(n.count(".") == 1 for n in names)  # key.ext, as WebDataset splits them


def test_flat_folder_is_unlabeled(make_image_folder, tmp_path):
    src = make_image_folder(classes=0, per_class=5, fmt="PNG", ext="png")
    manifest = prepare_dataset(str(src), str(tmp_path / "out"))
    assert manifest["num_classes"] == 0 and manifest["has_labels"] is False
    assert {label for _, label in read_everything(str(tmp_path / "out")).values()} == {-1}


def test_shards_respect_the_target_size(make_image_folder, tmp_path):
    src = make_image_folder(classes=2, per_class=20)
    target = 24 * 1024
    manifest = prepare_dataset(str(src), str(tmp_path / "out"), shard_bytes=target)
    assert all(s["num_bytes"] <= target for s in manifest["shards"])
    assert len(manifest["shards"]) > 2
    assert all(s["num_bytes"] > target // 2 for s in manifest["shards"][:-1])  # filled, not split early
    by_count = prepare_dataset(str(src), str(tmp_path / "out2"), samples_per_shard=6)
    assert [s["num_samples"] for s in by_count["shards"]] == [6] * 6 + [4]


def test_mixed_layout_and_empty_or_missing_sources_are_refused(tmp_path):
    mixed = tmp_path / "mixed"
    (mixed / "cat").mkdir(parents=True)
    (mixed / "top.jpg").write_bytes(image_bytes(0))
    (mixed / "cat" / "a.jpg").write_bytes(image_bytes(1))
    with pytest.raises(DataError, match="mixes images at the top level"):
        prepare_dataset(str(mixed), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match="no .jpg"):
        prepare_dataset(str(tmp_path / "empty"), str(tmp_path / "out"))
    with pytest.raises(DataError, match="does not exist"):
        prepare_dataset(str(tmp_path / "nowhere"), str(tmp_path / "out"))


def test_colliding_keys_are_made_unique(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.jpg").write_bytes(image_bytes(0))
    (src / "x.png").write_bytes(image_bytes(1, fmt="PNG"))
    (src / "x_1.v2.jpg").write_bytes(image_bytes(2))
    prepare_dataset(str(src), str(tmp_path / "out"))
    assert len(read_everything(str(tmp_path / "out"))) == 3


def _tar_of(root: Path, target: Path, top: str = "", mode: str = "w") -> Path:
    with tarfile.open(target, mode) as tar:
        for path in sorted(root.rglob("*.*")):
            tar.add(path, arcname=f"{top}{path.relative_to(root)}")
    return target


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "zip", "nested"])
def test_archives_give_the_same_samples_as_the_folder(make_image_folder, tmp_path, kind):
    src = make_image_folder(classes=3, per_class=4)
    if kind == "tar":
        archive = _tar_of(src, tmp_path / "a.tar", top="dataset/")
    elif kind == "tar.gz":
        archive = _tar_of(src, tmp_path / "a.tar.gz", mode="w:gz")
    elif kind == "zip":
        archive = tmp_path / "a.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted(src.rglob("*.*")):
                zf.write(path, arcname=str(path.relative_to(src)))
    else:  # ImageNet's train archive: one uncompressed tar per class inside a tar
        archive = tmp_path / "a.tar"
        with tarfile.open(archive, "w") as outer:
            for folder in sorted(p for p in src.iterdir()):
                inner = _tar_of(folder, tmp_path / f"{folder.name}.tar")
                outer.add(inner, arcname=inner.name)
    prepare_dataset(str(archive), str(tmp_path / "out"), shard_bytes=16 * 1024)
    assert read_everything(str(tmp_path / "out")) == folder_contents(src)


def test_interrupted_run_has_no_manifest_and_a_rerun_resumes(make_image_folder, tmp_path,
                                                             monkeypatch):
    src = make_image_folder(classes=2, per_class=12)
    dest = tmp_path / "out"
    real_finish = prepare_module._finish
    finished = []

    def crash_after_two(*args, **kwargs):
        if len(finished) == 2:
            raise KeyboardInterrupt("killed")
        finished.append(real_finish(*args, **kwargs))
        return finished[-1]

    monkeypatch.setattr(prepare_module, "_finish", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(str(src), str(dest), samples_per_shard=5)
    assert not (dest / "manifest.json").exists()
    with pytest.raises(DataError, match="incomplete data set"):
        open_dataset(str(dest), storage())

    rewritten = []
    monkeypatch.setattr(prepare_module, "_finish",
                        lambda w, *a, **k: rewritten.append(Path(w.path).name) or real_finish(w, *a, **k))
    first_two = [(dest / f"shard-00000{i}.tar").stat().st_mtime_ns for i in range(2)]
    manifest = prepare_dataset(str(src), str(dest), samples_per_shard=5)
    assert rewritten == ["shard-000002.tar", "shard-000003.tar", "shard-000004.tar"]
    assert [(dest / f"shard-00000{i}.tar").stat().st_mtime_ns for i in range(2)] == first_two
    fresh = prepare_dataset(str(src), str(tmp_path / "fresh"), samples_per_shard=5)
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in fresh["shards"]]


def test_complete_destination_is_left_alone_and_not_mistaken(make_image_folder, tmp_path):
    src = make_image_folder(classes=2, per_class=3)
    dest = tmp_path / "out"
    first = prepare_dataset(str(src), str(dest))
    stamp = (dest / "manifest.json").stat().st_mtime_ns
    assert prepare_dataset(str(src), str(dest)) == first
    assert (dest / "manifest.json").stat().st_mtime_ns == stamp
    other = make_image_folder(classes=1, per_class=2, name="other")
    with pytest.raises(DataError, match="already holds a complete data set"):
        prepare_dataset(str(other), str(dest))
    replaced = prepare_dataset(str(other), str(dest), overwrite=True)
    assert replaced["num_samples"] == 2
    assert sorted(p.name for p in dest.glob("shard-*.tar")) == ["shard-000000.tar"]


def test_cli_prepares_a_data_set_and_documents_its_options(make_image_folder, tmp_path):
    src = make_image_folder(classes=2, per_class=4)
    script = str(REPO / "jobs" / "prepare_data.py")
    helped = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert helped.returncode == 0
    assert "--shard-size" in helped.stdout and "--endpoint-url" in helped.stdout
    assert "--max_side None" in helped.stdout  # off by default; --max-side works too
    done = subprocess.run([sys.executable, script, str(src), str(tmp_path / "out"),
                           "--shard-size", "16KB", "--max-side", "32"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "8 images in" in done.stdout
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["extra"]["max_side"] == 32
    assert "images/s" in done.stderr  # progress lines
    failed = subprocess.run([sys.executable, script, str(tmp_path / "missing"),
                             str(tmp_path / "out2")], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert failed.returncode == 2 and "does not exist" in failed.stderr


@pytest.mark.parametrize("text,expected", [("256MB", 256 * 2**20), ("1.5GB", 3 * 2**29),
                                           ("64KiB", 65536), ("1000", 1000)])
def test_shard_size_parsing(text, expected):
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        from prepare_data import parse_size
    finally:
        sys.path.remove(str(REPO / "jobs"))
    assert parse_size(text) == expected


def test_reading_from_the_middle_of_a_shard_uses_offsets(make_image_folder, tmp_path):
    src = make_image_folder(classes=1, per_class=9)
    prepare_dataset(str(src), str(tmp_path / "out"))
    dataset = open_dataset(str(tmp_path / "out"), storage())
    every = [s.key for s in dataset.read(0, 0, 9)]
    assert [s.key for s in dataset.read(0, 4, 7)] == every[4:7]
    (tmp_path / "out" / "shard-000000.index.json").unlink()  # other tools write no index
    fresh = open_dataset(str(tmp_path / "out"), storage())
    assert [s.key for s in fresh.read(0, 4, 7)] == every[4:7]




# ---------------------------------------------------------------- symlinks


def test_symlinks_leaving_the_source_are_refused(make_image_folder, tmp_path):
    src = make_image_folder(classes=2, per_class=2)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    (src / "class_0" / "cat.jpg").symlink_to(secret)
    with pytest.raises(DataError, match=rf"{src}/class_0/cat.jpg is a symlink to {secret}, outside the source "
                                        r"folder; refused"):
        prepare_dataset(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # refused while listing, before anything is written
    (src / "class_0" / "cat.jpg").unlink()
    outside = tmp_path / "outside"
    outside.mkdir()
    (src / "class_1" / "more").symlink_to(outside)  # a folder leaving SRC too
    with pytest.raises(DataError, match=rf"{src}/class_1/more is a symlink to {outside}, outside"):
        prepare_dataset(str(src), str(tmp_path / "out"))


def test_dangling_and_folder_symlinks_are_skipped_and_counted(make_image_folder, tmp_path, caplog):
    src = make_image_folder(classes=2, per_class=2)
    (src / "class_0" / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (src / "class_1" / "alias.jpg").symlink_to(src / "class_0" / "img_0_0.JPEG")  # inside SRC: read
    (src / "class_1" / "again").symlink_to(src / "class_0")  # a folder inside SRC: not followed
    with caplog.at_level("WARNING", logger="service.data.sources"):
        manifest = prepare_dataset(str(src), str(tmp_path / "out"))
    assert manifest["num_samples"] == 5
    assert manifest["extra"]["skipped"] == {"dangling symlinks": 1, "symlinked folders (not followed)": 1}
    assert f"skipped 1 dangling symlinks, e.g. {src}/class_0/gone.jpg -> {tmp_path}/deleted.jpg" in caplog.text
    contents = read_everything(str(tmp_path / "out"))
    assert contents["class_1/alias"] == (contents["class_0/img_0_0"][0], 1)  # its bytes, labeled by its folder


# ---------------------------------------------------------------- storage errors


def test_a_missing_destination_bucket_is_an_error_and_never_created(s3_server, make_image_folder):
    src = make_image_folder(classes=2, per_class=2)
    with pytest.raises(DataError, match=r"^s3://no-such-dest-7c2e/imgs: bucket 'no-such-dest-7c2e' does not exist; "
                                        r"create it first"):
        prepare_dataset(str(src), "s3://no-such-dest-7c2e/imgs")
    names = {b["Name"] for b in boto3.client("s3", endpoint_url=s3_server).list_buckets()["Buckets"]}
    assert "no-such-dest-7c2e" not in names


def test_overwrite_into_a_new_prefix_of_an_existing_bucket(s3_bucket, make_image_folder):
    src = make_image_folder(classes=2, per_class=2)
    assert prepare_dataset(str(src), f"{s3_bucket}/fresh", overwrite=True)["num_samples"] == 4


def test_an_unreachable_source_is_one_line_naming_it(s3_server, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = storage_options(StorageConfig(endpoint_url=f"http://127.0.0.1:{port}", max_retries=0))
    with pytest.raises(DataError, match=r"^s3://photos/raw: cannot read the source \(EndpointConnectionError: "
                                        rf"Could not connect to the endpoint URL: \"http://127.0.0.1:{port}/"):
        prepare_dataset("s3://photos/raw", str(tmp_path / "out"), storage_options=options)


def test_cli_reports_a_missing_bucket_in_one_line(s3_server, make_image_folder, capsys):
    # In-process: the same run_job path as the script, without its start-up time.
    from jobs.prepare_data import main

    src = make_image_folder(classes=2, per_class=2)
    with pytest.raises(SystemExit) as exited:
        main([str(src), "s3://no-such-dest-91ab/x"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == ("prepare_data.py: error: s3://no-such-dest-91ab/x: bucket 'no-such-dest-91ab' "
                                       "does not exist; create it first (jobs never create buckets)\n")


def test_max_side_stores_large_images_scaled_down_and_small_ones_untouched(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    originals = {"wide": image_bytes(1, (200, 150)), "tall": image_bytes(2, (90, 300), "PNG"),
                 "small": image_bytes(3, (40, 30)), "edge": image_bytes(4, (64, 64))}
    for name, data in originals.items():
        (src / f"{name}.{'png' if name == 'tall' else 'jpg'}").write_bytes(data)
    manifest = prepare_dataset(str(src), str(tmp_path / "ds"), max_side=64)
    assert manifest["extra"]["max_side"] == 64 and manifest["extra"]["resized_by_this_run"] == 2
    stored = read_everything(str(tmp_path / "ds"))
    assert stored["small"][0] == originals["small"] and stored["edge"][0] == originals["edge"]
    with Image.open(io.BytesIO(stored["wide"][0])) as wide, Image.open(io.BytesIO(stored["tall"][0])) as tall:
        assert (wide.format, wide.size) == ("JPEG", (85, 64))
        assert (tall.format, tall.size) == ("PNG", (64, 213))


def test_max_side_is_off_by_default_and_checked(make_image_folder, tmp_path):
    from service.config import ConfigError, PrepareDataConfig, load_config

    assert PrepareDataConfig().max_side is None
    assert "max_side" not in prepare_dataset(str(make_image_folder(classes=1, per_class=2)),
                                             str(tmp_path / "ds"))["extra"]
    with pytest.raises(ConfigError, match=r"max_side=8 is not allowed: >= 16"):
        load_config(PrepareDataConfig, None, {"src": "a", "dest": "b", "max_side": 8})


def test_progress_is_one_line_per_interval_not_one_per_shard(make_image_folder, tmp_path, caplog):
    src = make_image_folder(classes=2, per_class=12)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="service.data.prepare"):
        prepare_dataset(str(src), str(tmp_path / "out"), samples_per_shard=1)
    elapsed = time.monotonic() - started
    lines = [r.getMessage() for r in caplog.records if "images/s" in r.getMessage()]
    # 24 shards: the first logged at once, then at most one line per interval
    assert lines and "shard-000000.tar" in lines[0]
    assert len(lines) <= 1 + elapsed / prepare_module.PROGRESS_EVERY_S, lines
    assert any("complete: 24 images in 24 shards" in r.getMessage() for r in caplog.records)
